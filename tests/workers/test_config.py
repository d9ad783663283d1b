"""config.json parsing: published keys, transformers' rope_parameters, and clear refusals."""

from __future__ import annotations

import copy
import json

import pytest

from moecluster.workers.config import ConfigError, ModelConfig


@pytest.fixture
def raw(tiny_checkpoint) -> dict:
    return json.loads((tiny_checkpoint() / "config.json").read_text())


def test_published_rope_keys(raw: dict) -> None:
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope.kind == "yarn" and cfg.rope.factor == 8.0 and cfg.rope.original_max_position_embeddings == 64
    assert cfg.latent_dim == cfg.kv_lora_rank + cfg.qk_rope_head_dim


def test_rope_parameters_form_is_equivalent(raw: dict) -> None:
    new = copy.deepcopy(raw)
    scaling, theta = new.pop("rope_scaling"), new.pop("rope_theta")
    new["rope_parameters"] = {"rope_type": scaling.pop("type"), "rope_theta": theta, **scaling}
    assert ModelConfig.from_hf(new).rope == ModelConfig.from_hf(raw).rope


def test_plain_rope(raw: dict) -> None:
    raw["rope_scaling"] = None
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope.kind == "default" and cfg.softmax_scale == cfg.qk_head_dim**-0.5


def test_softmax_scale_has_yarn_mscale(raw: dict) -> None:
    import math

    cfg = ModelConfig.from_hf(raw)
    mscale = 0.1 * math.log(8.0) + 1.0
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5 * mscale**2)


def test_matches_transformers_rope_init(raw: dict) -> None:
    """Our YaRN frequencies and cos/sin scale against transformers' own implementation."""
    import torch
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moecluster.workers.model.rope import rope_inv_freq

    for overrides in ({}, {"mscale": 0.707, "mscale_all_dim": 1.0}, {"beta_fast": 1.0, "beta_slow": 1.0}):
        r = copy.deepcopy(raw)
        r["rope_scaling"].update(overrides)
        hf = DeepseekV3Config(**{k: v for k, v in r.items() if k not in ("model_type", "architectures")})
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
        ours = ModelConfig.from_hf(r).rope
        assert torch.equal(rope_inv_freq(ours, r["qk_rope_head_dim"]), inv_freq)
        assert ours.cos_sin_scale() == pytest.approx(attention_factor)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: c.__setitem__("model_type", "llama"), "model_type"),
        (lambda c: c.pop("hidden_size"), "hidden_size"),
        (lambda c: c.__setitem__("hidden_size", "big"), "hidden_size"),
        (lambda c: c.__setitem__("rope_scaling", {"type": "longrope", "factor": 2.0}), "rope_scaling"),
        (lambda c: c.__setitem__("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}), "rope_parameters"),
        (lambda c: c.__setitem__("scoring_func", "softmax"), "scoring_func"),
        (lambda c: c.__setitem__("topk_method", "greedy"), "topk_method"),
        (lambda c: c.__setitem__("n_group", 3), "n_group"),
        (lambda c: c.__setitem__("topk_group", 9), "topk_group"),
        (lambda c: c.__setitem__("num_experts_per_tok", 0), "num_experts_per_tok"),
        (lambda c: c.__setitem__("hidden_act", "gelu"), "hidden_act"),
        (lambda c: c.__setitem__("qk_rope_head_dim", 15), "qk_rope_head_dim"),
        (lambda c: c.__setitem__("quantization_config", {"quant_method": "gptq"}), "quant_method"),
        (lambda c: c.__setitem__("eos_token_id", "eos"), "eos_token_id"),
    ],
)
def test_unsupported_values_name_the_field(raw: dict, change, field: str) -> None:  # noqa: ANN001
    change(raw)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf(raw)


def test_kimi_k2_config(tiny_checkpoint) -> None:
    cfg = ModelConfig.from_dir(tiny_checkpoint(arch="kimi-k2"))
    assert cfg.model_type == "kimi_k2" and cfg.n_group == 1 and cfg.num_nextn_predict_layers == 0
