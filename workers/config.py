"""The model configuration, read from a checkpoint's ``config.json`` as published.

DeepSeek-V3/R1 (``model_type: deepseek_v3``) and Kimi K2 / K2-Thinking (``model_type: kimi_k2``)
share one architecture. Rope comes either as the published ``rope_theta`` + ``rope_scaling``
(with ``type``) or as transformers' newer ``rope_parameters`` (with ``rope_type``). Every value
the model cannot honour fails here, with the field and the reason, before any weight is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from moecluster.workers.quant import QuantScheme, parse_quant_config

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "kimi_k2")


class ConfigError(ValueError):
    """A config.json value the model does not support; the message names the field."""


class RopeConfig(BaseModel):
    """Rotary embedding: plain rope or static YaRN with DeepSeek's attention-scale correction."""

    model_config = ConfigDict(frozen=True)

    theta: float
    kind: Literal["default", "yarn"] = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    interleaved: bool = True  # checkpoints store rope dims as (x0, x1), (x2, x3), ... pairs

    def cos_sin_scale(self) -> float:
        """Factor applied to cos/sin (YaRN's attention_factor)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def softmax_scale_correction(self) -> float:
        """Multiplier on head_dim**-0.5: mscale(factor, mscale_all_dim) squared (DeepSeek's MLA)."""
        if self.kind != "yarn" or not self.mscale_all_dim:
            return 1.0
        m = yarn_mscale(self.factor, self.mscale_all_dim)
        return m * m


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class ModelConfig(BaseModel):
    """Everything the DeepSeek-V3 stack needs, validated on construction."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    model_type: Literal["deepseek_v3", "kimi_k2"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_nextn_predict_layers: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str
    rope: RopeConfig
    quant: QuantScheme | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: the compressed KV plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * self.rope.softmax_scale_correction()

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir}: no config.json (is this a Hugging Face checkpoint directory?)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf(raw)

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        return cls(**_parse_hf(raw))


def _get(raw: dict[str, Any], key: str, default: Any = ..., kind: type | tuple[type, ...] = (int,)) -> Any:
    if key not in raw or raw[key] is None:
        if default is ...:
            raise ConfigError(f"config.json: required field '{key}' is missing")
        return default
    value = raw[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"config.json: '{key}' must be a number, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"config.json: '{key}' has the wrong type ({type(value).__name__}: {value!r})")
    return value


def _require(cond: bool, field: str, reason: str) -> None:
    if not cond:
        raise ConfigError(f"config.json: '{field}' {reason}")


def _parse_hf(raw: dict[str, Any]) -> dict[str, Any]:
    model_type = raw.get("model_type")
    _require(
        model_type in SUPPORTED_MODEL_TYPES,
        "model_type",
        f"is {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
    )
    num = (int, float)
    fields: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": _get(raw, "vocab_size"),
        "hidden_size": _get(raw, "hidden_size"),
        "intermediate_size": _get(raw, "intermediate_size"),
        "moe_intermediate_size": _get(raw, "moe_intermediate_size"),
        "num_hidden_layers": _get(raw, "num_hidden_layers"),
        "num_attention_heads": _get(raw, "num_attention_heads"),
        "q_lora_rank": _get(raw, "q_lora_rank", None),
        "kv_lora_rank": _get(raw, "kv_lora_rank"),
        "qk_nope_head_dim": _get(raw, "qk_nope_head_dim"),
        "qk_rope_head_dim": _get(raw, "qk_rope_head_dim"),
        "v_head_dim": _get(raw, "v_head_dim"),
        "n_routed_experts": _get(raw, "n_routed_experts", 0),
        "n_shared_experts": _get(raw, "n_shared_experts", 0),
        "num_experts_per_tok": _get(raw, "num_experts_per_tok", 0),
        "n_group": _get(raw, "n_group", 1),
        "topk_group": _get(raw, "topk_group", 1),
        "routed_scaling_factor": float(_get(raw, "routed_scaling_factor", 1.0, num)),
        "norm_topk_prob": _get(raw, "norm_topk_prob", False, bool),
        "first_k_dense_replace": _get(raw, "first_k_dense_replace", 0),
        "rms_norm_eps": float(_get(raw, "rms_norm_eps", 1e-6, num)),
        "max_position_embeddings": _get(raw, "max_position_embeddings"),
        "tie_word_embeddings": _get(raw, "tie_word_embeddings", False, bool),
        "num_nextn_predict_layers": _get(raw, "num_nextn_predict_layers", _get(raw, "num_mtp_layers", 0)),
        "bos_token_id": _get(raw, "bos_token_id", None),
        "eos_token_ids": _eos_ids(raw.get("eos_token_id")),
        "torch_dtype": str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        "rope": _parse_rope(raw),
        "quant": _parse_quant(raw.get("quantization_config")),
    }
    _check_architecture(raw, fields)
    return fields


def _parse_quant(cfg: Any) -> QuantScheme | None:
    try:
        return parse_quant_config(cfg)
    except ValueError as e:
        raise ConfigError(f"config.json: {e}") from e


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ConfigError(f"config.json: 'eos_token_id' must be an int or a list of ints, got {value!r}")


def _check_architecture(raw: dict[str, Any], f: dict[str, Any]) -> None:
    positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
    for key in positive:
        _require(f[key] > 0, key, f"must be positive, got {f[key]}")
    _require(f["qk_rope_head_dim"] % 2 == 0, "qk_rope_head_dim", f"must be even, got {f['qk_rope_head_dim']}")
    _require(f["q_lora_rank"] is None or f["q_lora_rank"] > 0, "q_lora_rank", "must be positive or null")
    act = raw.get("hidden_act", "silu")
    _require(act == "silu", "hidden_act", f"is {act!r}; only 'silu' is supported")
    _require(not raw.get("attention_bias", False), "attention_bias", "is true; the DeepSeek-V3 stack has no biases")
    scoring = raw.get("scoring_func", "sigmoid")
    _require(scoring == "sigmoid", "scoring_func", f"is {scoring!r}; only 'sigmoid' (noaux_tc) is supported")
    topk_method = raw.get("topk_method", "noaux_tc")
    _require(topk_method == "noaux_tc", "topk_method", f"is {topk_method!r}; only 'noaux_tc' is supported")
    _require(raw.get("moe_layer_freq", 1) == 1, "moe_layer_freq", "must be 1 (every layer after the dense ones is MoE)")
    kvh = raw.get("num_key_value_heads", f["num_attention_heads"])
    _require(kvh == f["num_attention_heads"], "num_key_value_heads", "must equal num_attention_heads for MLA")
    if f["n_routed_experts"] > 0:
        n, g, k = f["n_routed_experts"], f["n_group"], f["num_experts_per_tok"]
        _require(g > 0 and n % g == 0, "n_group", f"({g}) must divide n_routed_experts ({n})")
        _require(0 < f["topk_group"] <= g, "topk_group", f"({f['topk_group']}) must be in 1..n_group ({g})")
        _require(0 < k <= n, "num_experts_per_tok", f"({k}) must be in 1..n_routed_experts ({n})")
        per_group = n // g
        _require(g == 1 or per_group >= 2, "n_group", "leaves fewer than 2 experts per group (group score = top-2 sum)")
        _require(k <= f["topk_group"] * per_group, "num_experts_per_tok", "exceeds the experts in the chosen groups")
        _require(f["moe_intermediate_size"] > 0, "moe_intermediate_size", "must be positive")
    _require(0 <= f["first_k_dense_replace"] <= f["num_hidden_layers"], "first_k_dense_replace", "out of range")


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params and "rope_type" not in params:
            raise ConfigError("config.json: 'rope_parameters' must be one dict with rope_type and rope_theta")
        source, theta = "rope_parameters", params.get("rope_theta", raw.get("rope_theta"))
        kind = params.get("rope_type", params.get("type", "default"))
    else:
        params = raw.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"config.json: 'rope_scaling' must be a dict or null, got {params!r}")
        source, theta = "rope_scaling", raw.get("rope_theta", 10000.0)
        kind = params.get("type", params.get("rope_type", "default")) if params else "default"
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    interleaved = raw.get("rope_interleave", True)
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1:  # transformers would rotate only part of qk_rope_head_dim; MLA rotates all of it
        raise ConfigError(f"config.json: 'partial_rotary_factor' is {partial!r}; only 1 is supported")
    if kind == "default":
        return RopeConfig(theta=float(theta), interleaved=bool(interleaved))
    if kind != "yarn":
        raise ConfigError(f"config.json: '{source}' type {kind!r} is not supported (supported: default, yarn)")
    factor = params.get("factor")
    # A top-level original_max_position_embeddings wins over the rope dict's, as in transformers
    # (which moves it into its rope parameters).
    original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    if original is None:
        original = raw["max_position_embeddings"]
    if factor is None:
        factor = raw["max_position_embeddings"] / original
    if not isinstance(factor, (int, float)) or factor < 1:
        raise ConfigError(f"config.json: '{source}.factor' must be a number >= 1, got {factor!r}")
    return RopeConfig(
        theta=float(theta),
        kind="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        interleaved=bool(interleaved),
    )
