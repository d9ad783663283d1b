"""Config variants published checkpoints use, beyond the make-tiny defaults, against transformers'
DeepseekV3ForCausalLM (fp32): greedy tokens identical and logprobs within 1e-4.

test_parity.py covers the default tiny DeepSeek-V3 / Kimi K2 shapes in all three formats and
q_lora_rank null; here the other axes: no rope scaling (Moonlight: DeepSeek-V3 architecture, no
q compression, plain rope with theta 5e4, one routing group), other YaRN settings (DeepSeek-V2's
mscale 0.707), odd head counts and head dims, routing groups and top-k, shared experts 0 or 2, no
dense layers or several, unnormalised weights, tied embeddings, and expert parallelism over gloo.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moecluster import LLM, SamplingParams
from moecluster.workers.checkpoint.tiny import TinySpec, make_tiny
from tests.reference import assert_greedy_matches, load_reference

NEW_TOKENS = 8
PROMPT_LENGTHS = (5, 21, 70)  # block size 16: one block, two, and past YaRN's original window (64)


def _yarn(**changes: object) -> dict:
    base = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    return {**base, **changes}


VARIANTS: dict[str, tuple[dict, dict]] = {
    # name: (TinySpec knobs, config.json overrides)
    "moonlight-like": (
        {"q_lora_rank": None},
        {"rope_scaling": None, "rope_theta": 50000.0, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6,
         "routed_scaling_factor": 2.446},
    ),
    "odd-heads-and-dims": (
        {"num_heads": 3},
        {"kv_lora_rank": 96, "qk_nope_head_dim": 48, "qk_rope_head_dim": 32, "v_head_dim": 64},
    ),
    "v-wider-than-qk": ({"num_heads": 2}, {"qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 40}),
    "yarn-mscale-0.707": ({}, {"rope_scaling": _yarn(mscale=0.707, mscale_all_dim=0.707, beta_fast=16, beta_slow=2),
                               "rope_theta": 20000.0}),
    "yarn-no-mscale-all-dim": ({}, {"rope_scaling": _yarn(mscale_all_dim=None, factor=4.0),
                                    "max_position_embeddings": 256}),
    "rope-parameters-half-split": (
        {},
        {"rope_scaling": None, "rope_theta": None, "rope_interleave": False,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                             "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 1.0}},
    ),
    "groups-8-top-3-k2-unnormalised": (
        {}, {"n_group": 8, "topk_group": 3, "num_experts_per_tok": 2, "norm_topk_prob": False,
             "routed_scaling_factor": 1.0},
    ),
    "12-experts-3-groups-k1": ({"num_experts": 12}, {"n_group": 3, "topk_group": 2, "num_experts_per_tok": 1}),
    "no-shared-no-dense": ({}, {"n_shared_experts": 0, "first_k_dense_replace": 0}),
    "two-shared-three-dense": ({"num_layers": 4}, {"n_shared_experts": 2, "first_k_dense_replace": 3}),
}


def _variant_checkpoint(root: Path, name: str, quant: str = "none", arch: str = "deepseek-v3") -> Path:
    knobs, overrides = VARIANTS[name]
    spec = TinySpec(arch=arch, quant=quant, **{"num_layers": 2, **knobs})  # type: ignore[arg-type]
    return make_tiny(root / f"{name}-{arch}-{quant}", spec, overrides)


def _compare(ckpt: Path, tmp: Path, seed: str, **options: object) -> None:
    llm = LLM(model=ckpt, dtype="float32", device="cpu", block_size=16, num_kv_blocks=32, **options)
    try:
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        rng = random.Random(seed)
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENGTHS]
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    finally:
        if options.get("expert_parallel_size", 1) != 1:
            llm.engine.shutdown()
    assert_greedy_matches(load_reference(ckpt, tmp / "ref"), prompts, outputs, NEW_TOKENS, 1e-4)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_transformers(tmp_path: Path, name: str) -> None:
    _compare(_variant_checkpoint(tmp_path, name), tmp_path, name)


@pytest.mark.parametrize(("name", "arch", "quant"), [("odd-heads-and-dims", "deepseek-v3", "fp8"),
                                                     ("moonlight-like", "kimi-k2", "int4")])
def test_quantized_variant_matches_transformers(tmp_path: Path, name: str, arch: str, quant: str) -> None:
    _compare(_variant_checkpoint(tmp_path, name, quant, arch), tmp_path, name)


def test_expert_parallel_variant_matches_transformers(tmp_path: Path) -> None:
    """Two ranks over gloo, every layer MoE, no shared experts: the combine alone carries each layer."""
    _compare(_variant_checkpoint(tmp_path, "no-shared-no-dense"), tmp_path, "ep", expert_parallel_size=2)


def _tied_checkpoint(root: Path) -> Path:
    """make-tiny with tie_word_embeddings: the embedding is stored once, no lm_head.weight."""
    ckpt = make_tiny(root / "tied", TinySpec(num_layers=2), {"tie_word_embeddings": True})
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    return ckpt


def _rewrite(ckpt: Path, change) -> None:  # noqa: ANN001
    """Apply change(tensors) to every shard (it may add or drop names) and rewrite the index."""
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    weight_map = {}
    for i, file in enumerate(files):
        with safe_open(str(ckpt / file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        change(tensors, last=i == len(files) - 1)
        save_file(tensors, str(ckpt / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
    index["weight_map"] = dict(sorted(weight_map.items()))
    index_path.write_text(json.dumps(index))


def test_tied_embeddings_stored_once(tmp_path: Path) -> None:
    _compare(_tied_checkpoint(tmp_path), tmp_path, "tied")


def test_tied_embeddings_stored_as_head_only(tmp_path: Path) -> None:
    """Only lm_head.weight on disk: the embedding is read from it (transformers ties the other way)."""
    ckpt = _tied_checkpoint(tmp_path)

    def move(tensors: dict, last: bool) -> None:
        if "model.embed_tokens.weight" in tensors:
            tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")

    _rewrite(ckpt, move)
    _compare(ckpt, tmp_path, "tied-head")


def test_tied_config_with_a_distinct_head_on_disk(tmp_path: Path) -> None:
    """tie_word_embeddings true, yet the checkpoint stores a different lm_head.weight: the stored
    head is the one used (transformers does not tie them then), not a copy of the embedding."""
    ckpt = _tied_checkpoint(tmp_path)

    def add_head(tensors: dict, last: bool) -> None:
        if last:
            g = torch.Generator().manual_seed(1)
            vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
            tensors["lm_head.weight"] = (0.1 * torch.randn(vocab, 256, generator=g)).to(torch.bfloat16)

    _rewrite(ckpt, add_head)
    _compare(ckpt, tmp_path, "tied-distinct")


def test_random_weights_keep_the_head_tied(tmp_path: Path) -> None:
    from moecluster.workers.model_loader import load_model

    model = load_model(_tied_checkpoint(tmp_path), dtype="float32", load_format="random")
    assert torch.equal(model.lm_head.weight, model.embed_tokens)


def test_top_level_original_max_position_wins(tmp_path: Path) -> None:
    """original_max_position_embeddings beside rope_scaling overrides the one inside it (transformers'
    rule); the YaRN ramp and so the positions past the window follow it."""
    ckpt = make_tiny(tmp_path / "orig", TinySpec(num_layers=2), {"original_max_position_embeddings": 32})
    _compare(ckpt, tmp_path, "orig")


def test_partial_rotary_factor_is_refused() -> None:
    from moecluster.workers.config import ConfigError, ModelConfig
    from moecluster.workers.checkpoint.tiny import tiny_config

    raw = {**tiny_config(TinySpec(), 1024, 0, 1), "partial_rotary_factor": 0.5}
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        ModelConfig.from_hf(raw)


_FULL_SIZE = dict(
    vocab_size=1024, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=3,
)
def _published_yarn(max_positions: int, theta: float, factor: float, beta_fast: float, beta_slow: float,
                    mscale: float = 1.0) -> dict:
    """A published checkpoint's rope fields: YaRN from an original window of 4096 positions."""
    return dict(max_position_embeddings=max_positions, rope_theta=theta, rope_scaling=dict(
        type="yarn", factor=factor, original_max_position_embeddings=4096, beta_fast=beta_fast, beta_slow=beta_slow,
        mscale=mscale, mscale_all_dim=mscale))


_PUBLISHED_ROPE = {
    "deepseek-v3": _published_yarn(163840, 10000, 40, 32, 1),
    "kimi-k2": _published_yarn(131072, 50000.0, 32.0, 1.0, 1.0),
    "kimi-k2-thinking": _published_yarn(262144, 50000.0, 64.0, 1.0, 1.0),
    "deepseek-v2-lite-rope": _published_yarn(163840, 10000, 40, 32, 1, mscale=0.707),
    "moonlight": dict(max_position_embeddings=8192, rope_theta=50000, rope_scaling=None),
}


@pytest.mark.parametrize("name", list(_PUBLISHED_ROPE))
def test_published_rope_settings_match_transformers(name: str) -> None:
    """At the published context lengths (positions far past what a tiny model runs): cos/sin and
    the softmax scale equal transformers' for each published rope setting."""
    import copy

    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding, yarn_apply_mscale

    from moecluster.workers.config import ModelConfig
    from moecluster.workers.model.rope import RotaryEmbedding

    raw = {"model_type": "deepseek_v3", **_FULL_SIZE, **_PUBLISHED_ROPE[name]}
    ours = ModelConfig.from_hf(copy.deepcopy(raw))
    hf = DeepseekV3Config(**{k: copy.deepcopy(v) for k, v in raw.items() if k != "model_type"})
    theirs = DeepseekV3RotaryEmbedding(hf)
    positions = torch.tensor([0, 1, 100, 4095, 4096, 50_000, raw["max_position_embeddings"] - 1])
    cos, sin = RotaryEmbedding(ours.rope, ours.qk_rope_head_dim)(positions, torch.float32)  # (n, 1, 32)
    hf_cos, hf_sin = theirs(torch.zeros(1), positions[None])  # (1, n, 64): cat(freqs, freqs)
    assert torch.equal(cos[:, 0], hf_cos[0, :, :32]) and torch.equal(sin[:, 0], hf_sin[0, :, :32])
    assert ours.softmax_scale == pytest.approx(yarn_apply_mscale(hf.rope_parameters, hf.qk_head_dim**-0.5), rel=1e-12)
