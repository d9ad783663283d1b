"""The three full-size models as their published config.json files describe them.

Only the fields `ModelConfig` reads are kept; the values are the published ones
(deepseek-ai/DeepSeek-V3, moonshotai/Kimi-K2-Instruct, moonshotai/Kimi-K2-Thinking). Every
preset goes through `ModelConfig.from_hf`, the same path a checkpoint directory takes, so a
preset and a downloaded checkpoint give the same plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moecluster.workers.config import ModelConfig
from moecluster.workers.quant import Fp8BlockScheme, Int4GroupScheme
from moecluster.workers.quant.published import DEEPSEEK_FP8, KIMI_K2_THINKING_INT4

DEEPSEEK_V3: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 1,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
    "quantization_config": DEEPSEEK_FP8,
}

KIMI_K2: dict[str, Any] = {
    **DEEPSEEK_V3,
    "model_type": "kimi_k2",
    "vocab_size": 163840,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "n_routed_experts": 384,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.827,
    "first_k_dense_replace": 1,
    "num_nextn_predict_layers": 0,
    "max_position_embeddings": 131072,
    "rope_theta": 50000.0,
    "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    "bos_token_id": 163584,
    "eos_token_id": 163585,
}

KIMI_K2_THINKING: dict[str, Any] = {
    **KIMI_K2,
    "max_position_embeddings": 262144,
    "rope_scaling": {**KIMI_K2["rope_scaling"], "factor": 64.0},
    "eos_token_id": 163586,
    "quantization_config": KIMI_K2_THINKING_INT4,
}

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": DEEPSEEK_V3,
    "kimi-k2": KIMI_K2,
    "kimi-k2-thinking": KIMI_K2_THINKING,
}


def resolve_model(model: str | Path) -> tuple[str, ModelConfig]:
    """A preset name or a checkpoint directory -> (display name, config)."""
    key = str(model)
    path = Path(model)
    if key.lower() in PRESETS and not path.exists():  # DeepSeek-V3 as the model card spells it
        key = key.lower()
    if key in PRESETS:
        return key, ModelConfig.from_hf(PRESETS[key])
    if not path.exists():
        raise ValueError(f"unknown model {key!r}: not a preset ({', '.join(PRESETS)}) and no such directory")
    from moecluster.cluster.spec import check_checkpoint

    return str(path), check_checkpoint(path, weights=False)  # a config.json of any shape: one clear error


def format_label(cfg: ModelConfig) -> str:
    """How the weights are stored, in words."""
    q = cfg.quant
    if q is None:
        return f"{cfg.torch_dtype} (unquantized)"
    if isinstance(q, Fp8BlockScheme):
        return f"FP8 e4m3, {q.block[0]}x{q.block[1]} blocks with float32 scales (lm_head and router gate unquantized)"
    if isinstance(q, Int4GroupScheme):
        return f"INT4 pack-quantized, group {q.group_size} (where the scheme targets; the rest {cfg.torch_dtype})"
    return type(q).__name__
