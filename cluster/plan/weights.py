"""Parameter counts and resident bytes per component, from a config's shapes and weight formats.

Bytes of one (out, in) linear weight, by the format its checkpoint stores it in (which format a
matrix has comes from the checkpoint's quantization scheme, `QuantScheme.is_quantized` on its
HF module path, exactly as the loader decides):
  dense (model dtype, bf16)   out * in * 2
  FP8 block (bo, bi)          out * in * 1 + ceil(out / bo) * ceil(in / bi) * 4   (e4m3 + float32 weight_scale_inv)
  INT4 group g                ceil(in / 8) * 4 * out + out * ceil(in / g) * 2 + 8  (int32 words of 8 nibbles
                                                      + bf16 weight_scale + the int32 weight_shape pair)
RMSNorm weights are in the model dtype. The router gate weight and its e_score_correction_bias are
float32, 4 B each, as the MoE layer holds them (the gate weight is bf16 on disk). `lm_head` is
always dense (the FP8 scheme never quantizes it; K2-Thinking's INT4 ignores it).

One runtime extra that is not a checkpoint tensor: MLA's absorbed w_uk / w_uv, a model-dtype copy
of kv_b_proj prepared at load time, (heads, nope + v, kv_lora_rank) per layer.

DeepSeek-V3's MTP layers (index num_hidden_layers and up) are on disk but not loaded; their
parameters are counted for the on-disk total only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from moecluster.workers.config import ModelConfig
from moecluster.workers.quant import Fp8BlockScheme, Int4GroupScheme, QuantScheme

FP32, INT32 = 4, 4
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
KV_DTYPE_BYTES = {"bf16": 2, "fp8": 1}
ROUTED = "routed_experts"
# (component, params, bytes, count): `count` copies of one (params, bytes) term.
Term = tuple[str, int, int, int]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Component:
    name: str
    params: int
    bytes: int
    routed: bool = False  # split over the EP ranks; every other component is on every rank
    note: str = ""


@dataclass(frozen=True)
class WeightBreakdown:
    components: tuple[Component, ...]
    expert_params: int  # one routed expert (gate + up + down) of one layer
    expert_slot_bytes: int  # one expert slot through every MoE layer: what a rank holds per expert it owns
    moe_layers: int
    n_routed_experts: int
    top_k: int
    mtp_params: int  # on disk, not loaded: the MTP layers with their embed copy and head
    mtp_unique_params: int  # the same without the embed copy and the head

    @property
    def total_params(self) -> int:
        """Parameters we load (the main model)."""
        return sum(c.params for c in self.components)

    @property
    def routed_params(self) -> int:
        return sum(c.params for c in self.components if c.routed)

    @property
    def activated_params(self) -> int:
        """Per token: everything but the routed experts, plus top_k of them in every MoE layer."""
        return self.total_params - self.routed_params + self.top_k * self.expert_params * self.moe_layers

    @property
    def replicated_bytes(self) -> int:
        return sum(c.bytes for c in self.components if not c.routed)

    @property
    def routed_bytes(self) -> int:
        return sum(c.bytes for c in self.components if c.routed)

    @property
    def total_bytes(self) -> int:
        return self.replicated_bytes + self.routed_bytes


def dense_bytes(cfg: ModelConfig) -> int:
    if cfg.torch_dtype not in DTYPE_BYTES:
        raise ValueError(f"torch_dtype {cfg.torch_dtype!r} is not supported ({', '.join(DTYPE_BYTES)})")
    return DTYPE_BYTES[cfg.torch_dtype]


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str) -> int:
    """The MLA latent cache: (kv_lora_rank + rope_dim) values per token in every layer."""
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ValueError(f"unknown --kv-dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPE_BYTES)}")
    return cfg.num_hidden_layers * cfg.latent_dim * KV_DTYPE_BYTES[kv_dtype]


def matrix_bytes(scheme: QuantScheme | None, module: str, out_f: int, in_f: int, dtype_bytes: int) -> int:
    if scheme is None or not scheme.is_quantized(module):
        return out_f * in_f * dtype_bytes
    if isinstance(scheme, Fp8BlockScheme):
        bo, bi = scheme.block
        return out_f * in_f + cdiv(out_f, bo) * cdiv(in_f, bi) * FP32
    if isinstance(scheme, Int4GroupScheme):
        return out_f * cdiv(in_f, 8) * INT32 + out_f * cdiv(in_f, scheme.group_size) * dtype_bytes + 2 * INT32
    raise TypeError(f"unknown quantization scheme {scheme!r}")


def weight_breakdown(cfg: ModelConfig) -> WeightBreakdown:
    db = dense_bytes(cfg)
    h, vocab = cfg.hidden_size, cfg.vocab_size
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    slot_bytes = 0
    terms: list[Term] = []
    for layer in range(cfg.num_hidden_layers):
        terms += _layer_terms(cfg, layer, db)
        heads = cfg.num_attention_heads
        terms.append(("mla_absorbed", 0, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank * db, 1))
    terms.append(("norms", h, h * db, 1))  # model.norm
    terms.append(("embed_tokens", vocab * h, vocab * h * db, 1))
    # Tied: no parameters of its own, but the runtime keeps a dense copy of the embedding as the head.
    tied = cfg.tie_word_embeddings
    terms.append(("lm_head", 0 if tied else vocab * h, matrix_bytes(cfg.quant, "lm_head", vocab, h, db), 1))
    for name, params, nbytes, count in terms:
        acc[name][0] += params * count
        acc[name][1] += nbytes * count
        if name == ROUTED:
            slot_bytes += nbytes
    notes = {
        "mla_absorbed": "runtime copy of kv_b_proj (w_uk, w_uv) in the model dtype",
        "gate": "router weight + e_score_correction_bias, float32",
        "lm_head": "tied to embed_tokens (dense copy)" if tied else "",
    }
    components = tuple(
        Component(name, p, b, routed=name == ROUTED, note=notes.get(name, "")) for name, (p, b) in acc.items()
    )
    mtp_unique = mtp_shared = 0
    for i in range(cfg.num_nextn_predict_layers):
        layer = cfg.num_hidden_layers + i
        mtp_unique += sum(p * n for _, p, _, n in _layer_terms(cfg, layer, db))
        mtp_unique += 3 * h + 2 * h * h  # enorm, hnorm, shared_head.norm; eh_proj (hidden, 2 * hidden)
        mtp_shared += 2 * vocab * h  # the published checkpoint repeats embed_tokens and has its own head
    moe_layers = sum(cfg.is_moe_layer(layer) for layer in range(cfg.num_hidden_layers))
    return WeightBreakdown(
        components=components,
        expert_params=3 * cfg.moe_intermediate_size * h,
        expert_slot_bytes=slot_bytes,
        moe_layers=moe_layers,
        n_routed_experts=cfg.n_routed_experts,
        top_k=cfg.num_experts_per_tok,
        mtp_params=mtp_unique + mtp_shared,
        mtp_unique_params=mtp_unique,
    )


def _layer_terms(cfg: ModelConfig, layer: int, db: int) -> Iterator[Term]:
    """Every weight of one decoder layer, as (component, params, bytes, count)."""
    h, heads, q = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank
    p = f"model.layers.{layer}"

    def linear(component: str, path: str, out_f: int, in_f: int, count: int = 1) -> Term:
        return component, out_f * in_f, matrix_bytes(cfg.quant, f"{p}.{path}", out_f, in_f, db), count

    q_out = heads * cfg.qk_head_dim
    if q is None:
        yield linear("q_proj", "self_attn.q_proj", q_out, h)
    else:
        yield linear("q_a_proj", "self_attn.q_a_proj", q, h)
        yield linear("q_b_proj", "self_attn.q_b_proj", q_out, q)
        yield "norms", q, q * db, 1  # q_a_layernorm
    yield linear("kv_a_proj_with_mqa", "self_attn.kv_a_proj_with_mqa", cfg.latent_dim, h)
    yield "norms", cfg.kv_lora_rank, cfg.kv_lora_rank * db, 1  # kv_a_layernorm
    yield linear("kv_b_proj", "self_attn.kv_b_proj", heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    yield linear("o_proj", "self_attn.o_proj", h, heads * cfg.v_head_dim)
    yield "norms", 2 * h, 2 * h * db, 1  # input_layernorm, post_attention_layernorm
    if not cfg.is_moe_layer(layer):
        inter = cfg.intermediate_size
        yield from _mlp_terms(linear, "dense_mlp", "mlp", inter, h)
        return
    experts = cfg.n_routed_experts
    yield "gate", experts * h + experts, (experts * h + experts) * FP32, 1
    if cfg.n_shared_experts:
        yield from _mlp_terms(linear, "shared_experts", "mlp.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts, h)
    yield from _mlp_terms(linear, ROUTED, "mlp.experts.0", cfg.moe_intermediate_size, h, count=experts)


def _mlp_terms(linear, component: str, path: str, inter: int, h: int, count: int = 1) -> Iterator[Term]:  # noqa: ANN001
    """gate_proj and up_proj (inter, h), down_proj (h, inter), summed into one term."""
    parts = [linear(component, f"{path}.gate_proj", inter, h), linear(component, f"{path}.up_proj", inter, h),
             linear(component, f"{path}.down_proj", h, inter)]
    yield component, sum(t[1] for t in parts), sum(t[2] for t in parts), count
