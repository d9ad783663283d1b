"""The `quantization_config` blocks the published checkpoints carry, as config.json holds them."""

from __future__ import annotations

from typing import Any

# DeepSeek-V3/R1 and Kimi K2: e4m3 weights, one float32 weight_scale_inv per 128 x 128 block.
DEEPSEEK_FP8: dict[str, Any] = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}

# Kimi K2-Thinking: compressed-tensors pack-quantized INT4 (symmetric, group 32) for the routed
# experts only; attention, shared experts, the dense MLP and lm_head stay bf16.
KIMI_K2_THINKING_INT4: dict[str, Any] = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                "dynamic": False, "observer": "minmax", "actorder": None, "block_structure": None,
                "observer_kwargs": {},
            },
            "input_activations": None,
            "output_activations": None,
        }
    },
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None,
    "sparsity_config": {},
}
