"""`moecluster make-tiny`: a toy-size checkpoint of the real architecture, in the published formats.

The files look exactly like the published ones at a smaller width: `config.json` with legacy rope
keys (`rope_theta` + `rope_scaling.type`), per-expert tensor names
(`model.layers.L.mlp.experts.E.{gate,up,down}_proj.*`), sharded safetensors with an index,
DeepSeek-V3's MTP layer after the last decoder layer, and the weights either bf16, FP8 e4m3 with
128x128 `weight_scale_inv` blocks (DeepSeek-V3 / Kimi K2), or compressed-tensors pack-quantized
INT4 for the routed experts only (Kimi K2-Thinking). Weights are random, from a fixed seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from safetensors.torch import save_file

from moecluster.workers.checkpoint.loader import INDEX_FILE
from moecluster.workers.checkpoint.tiny_tokenizer import special_token_ids, write_generation_config, write_tiny_tokenizer
from moecluster.workers.config import ModelConfig
from moecluster.workers.quant import quantize_fp8_block, quantize_int4_group
from moecluster.workers.quant.published import DEEPSEEK_FP8, KIMI_K2_THINKING_INT4

Arch = Literal["deepseek-v3", "kimi-k2"]
Quant = Literal["none", "fp8", "int4"]

@dataclass(frozen=True)
class TinySpec:
    """Size knobs; the defaults give a model of a few MB that still exercises every code path
    (several FP8 blocks per matrix with partial edges, grouped routing, YaRN)."""

    arch: Arch = "deepseek-v3"
    quant: Quant = "none"
    hidden_size: int = 256
    num_layers: int = 3
    num_experts: int = 16
    num_heads: int = 4
    q_lora_rank: int | None = 96  # None: no q compression (q_proj), as in DeepSeek-V2-Lite
    vocab_size: int = 1024
    original_context: int = 64  # YaRN's original window, scaled by `rope_factor`
    rope_factor: float = 8.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % 32 or self.hidden_size < 64:
            raise ValueError(f"hidden_size must be a multiple of 32 and >= 64, got {self.hidden_size}")
        if self.num_layers < 2:
            raise ValueError("num_layers must be >= 2 (one dense layer, then MoE layers)")
        if self.num_experts < 8 or self.num_experts % 4:
            raise ValueError(f"num_experts must be a multiple of 4 and >= 8, got {self.num_experts}")


def tiny_config(spec: TinySpec, vocab_size: int, bos: int, eos: int) -> dict:
    deepseek = spec.arch == "deepseek-v3"
    h = spec.hidden_size
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3" if deepseek else "kimi_k2",
        "vocab_size": vocab_size,
        "hidden_size": h,
        "intermediate_size": 2 * h,
        "moe_intermediate_size": 3 * h // 4,  # 192 at h=256: one full and one partial FP8 block
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_heads,
        "q_lora_rank": spec.q_lora_rank,
        "kv_lora_rank": h // 4,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": spec.num_experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4 if deepseek else 1,
        "topk_group": 2 if deepseek else 1,
        "routed_scaling_factor": 2.5 if deepseek else 2.827,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 1 if deepseek else 0,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": int(spec.original_context * spec.rope_factor),
        "rope_theta": 10000.0 if deepseek else 50000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": spec.rope_factor,
            "original_max_position_embeddings": spec.original_context,
            "beta_fast": 32 if deepseek else 1.0,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }
    if spec.quant == "fp8":
        cfg["quantization_config"] = DEEPSEEK_FP8
    elif spec.quant == "int4":
        cfg["quantization_config"] = KIMI_K2_THINKING_INT4
    return cfg


def make_tiny(out_dir: str | Path, spec: TinySpec = TinySpec(), overrides: Mapping[str, Any] | None = None) -> Path:
    """Write config, tokenizer and weights to out_dir; returns the directory.

    `overrides` replaces config.json fields before the weights are drawn (a value of None writes
    null; the weights follow the resulting config), for the variants published checkpoints use
    beyond the spec's knobs: no rope scaling, other head dims, routing groups, shared experts..."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tiny_tokenizer(out, spec.arch, spec.vocab_size)
    bos, eos = special_token_ids(out)
    raw = {**tiny_config(spec, vocab, bos, eos), **(overrides or {})}
    cfg = ModelConfig.from_hf(raw)  # the writer only emits what the loader accepts
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    write_generation_config(out, bos, eos)
    tensors = _random_weights(cfg, spec)
    _write_shards(out, tensors, cfg.num_hidden_layers)
    return out


def _random_weights(cfg: ModelConfig, spec: TinySpec) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed)

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    t: dict[str, torch.Tensor] = {}

    def linear(path: str, out_f: int, in_f: int) -> None:
        w = randn(out_f, in_f, std=in_f**-0.5)
        if cfg.quant is not None and cfg.quant.is_quantized(path):
            if spec.quant == "fp8":
                t[f"{path}.weight"], t[f"{path}.weight_scale_inv"] = quantize_fp8_block(w.float())
                return
            t[f"{path}.weight_packed"], t[f"{path}.weight_scale"], t[f"{path}.weight_shape"] = quantize_int4_group(w.float())
            return
        t[f"{path}.weight"] = w

    def norm(path: str, dim: int) -> None:
        t[f"{path}.weight"] = (1.0 + 0.1 * torch.randn(dim, generator=g)).to(torch.bfloat16)

    h = cfg.hidden_size
    t["model.embed_tokens.weight"] = randn(cfg.vocab_size, h, std=1.0)
    for layer in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        p = f"model.layers.{layer}"
        norm(f"{p}.input_layernorm", h)
        norm(f"{p}.post_attention_layernorm", h)
        a = f"{p}.self_attn"
        q_out = cfg.num_attention_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            linear(f"{a}.q_proj", q_out, h)
        else:
            linear(f"{a}.q_a_proj", cfg.q_lora_rank, h)
            norm(f"{a}.q_a_layernorm", cfg.q_lora_rank)
            linear(f"{a}.q_b_proj", q_out, cfg.q_lora_rank)
        linear(f"{a}.kv_a_proj_with_mqa", cfg.latent_dim, h)
        norm(f"{a}.kv_a_layernorm", cfg.kv_lora_rank)
        linear(f"{a}.kv_b_proj", cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        linear(f"{a}.o_proj", h, cfg.num_attention_heads * cfg.v_head_dim)
        if not cfg.is_moe_layer(layer):
            for name, o, i in (("gate_proj", cfg.intermediate_size, h), ("up_proj", cfg.intermediate_size, h),
                               ("down_proj", h, cfg.intermediate_size)):
                linear(f"{p}.mlp.{name}", o, i)
            continue
        inter = cfg.moe_intermediate_size
        t[f"{p}.mlp.gate.weight"] = randn(cfg.n_routed_experts, h, std=0.1)
        t[f"{p}.mlp.gate.e_score_correction_bias"] = 0.05 * torch.randn(cfg.n_routed_experts, generator=g)
        for e in range(cfg.n_routed_experts):
            for name, o, i in (("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)):
                linear(f"{p}.mlp.experts.{e}.{name}", o, i)
        shared = inter * cfg.n_shared_experts
        for name, o, i in (("gate_proj", shared, h), ("up_proj", shared, h), ("down_proj", h, shared)):
            if shared:  # n_shared_experts 0: no shared experts' tensors
                linear(f"{p}.mlp.shared_experts.{name}", o, i)
        if layer >= cfg.num_hidden_layers:  # DeepSeek-V3's MTP module around its decoder layer
            norm(f"{p}.enorm", h)
            norm(f"{p}.hnorm", h)
            t[f"{p}.eh_proj.weight"] = randn(h, 2 * h)
            norm(f"{p}.shared_head.norm", h)
            t[f"{p}.shared_head.head.weight"] = randn(cfg.vocab_size, h)
    norm("model.norm", h)
    if not cfg.tie_word_embeddings:  # tied: the embedding is the head, stored once
        t["lm_head.weight"] = randn(cfg.vocab_size, h, std=0.1)
    return t


SHARD_FILES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _write_shards(out: Path, tensors: dict[str, torch.Tensor], num_layers: int) -> None:
    """Two shards split at the middle layer, plus model.safetensors.index.json."""
    def shard_of(name: str) -> int:
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            return 1 if int(parts[2]) < num_layers // 2 + 1 else 2
        return 1 if name.startswith("model.embed") else 2

    files = dict(enumerate(SHARD_FILES, start=1))
    weight_map, total = {}, 0
    for shard, file in files.items():
        part = {k: v.contiguous() for k, v in tensors.items() if shard_of(k) == shard}
        save_file(part, str(out / file), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = file
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
