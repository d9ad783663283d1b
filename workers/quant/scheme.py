"""Typed view of a Hugging Face `quantization_config` (config.json) for the weight formats we load.

Supported:
  - DeepSeek-V3 / Kimi-K2 block FP8: `{"quant_method": "fp8", "fmt": "e4m3",
    "weight_block_size": [bo, bi], "activation_scheme": "dynamic"}` -> Fp8BlockScheme
  - Kimi-K2-Thinking compressed-tensors INT4: `{"quant_method": "compressed-tensors",
    "format": "pack-quantized", "config_groups": {...weights: int4, symmetric, group...},
    "ignore": [...]}` -> Int4GroupScheme
Everything else raises UnsupportedQuantization naming the offending field path.

Module names are HF module paths (`model.layers.3.mlp.experts.7.down_proj`, `lm_head`). The MoE
router `*.mlp.gate` is a small non-Linear module in DeepSeek-V3 and Kimi K2 and is never quantized.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

ROOT = "quantization_config"
_REGEX_PREFIX = "re:"


class UnsupportedQuantization(ValueError):
    """A quantization_config this project cannot load; the message names the field path."""


@dataclass(frozen=True)
class QuantScheme(ABC):
    """How a checkpoint's linear weights are stored."""

    @abstractmethod
    def is_quantized(self, module_name: str) -> bool:
        """Whether the linear module at this HF path is stored quantized."""

    @abstractmethod
    def to_hf_config(self) -> dict[str, Any]:
        """The `quantization_config` dict to write into config.json for this scheme."""


@dataclass(frozen=True)
class Fp8BlockScheme(QuantScheme):
    """e4m3 weights with one float32 `weight_scale_inv` per (block[0], block[1]) tile.

    Every Linear is quantized except `lm_head` (and the MTP `shared_head.head`), the router
    `*.mlp.gate` and modules listed in `ignore` (from `modules_to_not_convert` /
    `ignored_layers`: `re:` entries are regexes (re.match), plain entries match whole dotted
    components, so `mlp.gate` matches `model.layers.3.mlp.gate`).
    """

    block: tuple[int, int] = (128, 128)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.block) != 2 or not all(_is_pos_int(b) for b in self.block):
            raise ValueError(f"Fp8BlockScheme.block must be two positive ints, got {self.block!r}")
        object.__setattr__(self, "block", tuple(self.block))
        object.__setattr__(self, "ignore", _check_names(self.ignore, "Fp8BlockScheme.ignore"))

    def is_quantized(self, module_name: str) -> bool:
        if _is_vocab_head(module_name) or is_router_gate(module_name):
            return False
        return not any(_matches_component_entry(entry, module_name) for entry in self.ignore)

    def to_hf_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": list(self.block),
            "activation_scheme": "dynamic",
        }
        if self.ignore:
            cfg["modules_to_not_convert"] = list(self.ignore)
        return cfg


@dataclass(frozen=True)
class Int4GroupScheme(QuantScheme):
    """compressed-tensors pack-quantized symmetric INT4, one scale per `group_size` inputs.

    A module is quantized when a target matches (`Linear` matches any linear module path, i.e.
    anything but the router gate; `re:` targets are regexes (re.match); other plain targets are
    exact module names) and no `ignore` entry matches (`re:` regexes via re.match, else exact).
    """

    group_size: int = 32
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _is_pos_int(self.group_size):
            raise ValueError(
                f"Int4GroupScheme.group_size must be a positive int, got {self.group_size!r}"
            )
        targets = _check_names(self.targets, "Int4GroupScheme.targets")
        if not targets:
            raise ValueError("Int4GroupScheme.targets must not be empty")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "ignore", _check_names(self.ignore, "Int4GroupScheme.ignore"))

    def is_quantized(self, module_name: str) -> bool:
        if not any(_matches_target(t, module_name) for t in self.targets):
            return False
        return not any(_matches_exact_entry(entry, module_name) for entry in self.ignore)

    def to_hf_config(self) -> dict[str, Any]:
        weights = {
            "num_bits": 4,
            "type": "int",
            "symmetric": True,
            "strategy": "group",
            "group_size": self.group_size,
            "dynamic": False,
            "actorder": None,
            "block_structure": None,
            "observer": "minmax",
            "observer_kwargs": {},
        }
        group = {
            "targets": list(self.targets),
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
        }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {"group_0": group},
            "ignore": list(self.ignore),
            "kv_cache_scheme": None,
            "quantization_status": "compressed",
        }


def is_router_gate(module_name: str) -> bool:
    """The MoE router (`model.layers.N.mlp.gate`), not to be confused with `mlp.gate_proj`."""
    return module_name == "mlp.gate" or module_name.endswith(".mlp.gate")


def parse_quant_config(cfg: dict[str, Any] | None) -> QuantScheme | None:
    """Parse config.json's `quantization_config`; None (absent) means unquantized weights."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise UnsupportedQuantization(f"{ROOT}: expected a mapping, got {type(cfg).__name__}")
    method = _require(cfg, "quant_method", ROOT)
    if method == "fp8":
        return _parse_fp8(cfg)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(cfg)
    raise _unsupported(f"{ROOT}.quant_method", method, '"fp8", "compressed-tensors"')


def _parse_fp8(cfg: dict[str, Any]) -> Fp8BlockScheme:
    _expect(cfg, "fmt", ROOT, ("e4m3",), optional=True)
    _expect(cfg, "activation_scheme", ROOT, ("dynamic",), optional=True)
    path = f"{ROOT}.weight_block_size"
    if cfg.get("weight_block_size") is None:
        raise UnsupportedQuantization(
            f"{path}: missing; per-tensor FP8 is not supported (only block FP8)"
        )
    block = cfg["weight_block_size"]
    is_pair = isinstance(block, (list, tuple)) and len(block) == 2
    if not (is_pair and all(_is_pos_int(b) for b in block)):
        raise _unsupported(path, block, "two positive ints [out, in]")
    ignore: list[str] = []
    for key in ("modules_to_not_convert", "ignored_layers"):
        ignore += _string_list(cfg.get(key), f"{ROOT}.{key}")
    return Fp8BlockScheme(block=(int(block[0]), int(block[1])), ignore=tuple(dict.fromkeys(ignore)))


def _parse_compressed_tensors(cfg: dict[str, Any]) -> Int4GroupScheme:
    _expect(cfg, "format", ROOT, ("pack-quantized",))
    _expect(cfg, "quantization_status", ROOT, ("compressed",), optional=True)
    _expect(cfg, "kv_cache_scheme", ROOT, (None,), optional=True)
    groups = cfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise UnsupportedQuantization(
            f"{ROOT}.config_groups: expected a non-empty mapping, got {_show(groups)}"
        )
    group_size: int | None = None
    first_group = ""
    targets: list[str] = []
    for name, group in groups.items():
        path = f"{ROOT}.config_groups.{name}"
        size = _parse_group(group, path)
        if group_size is None:
            group_size, first_group = size, name
        elif size != group_size:
            raise UnsupportedQuantization(
                f"{path}.weights.group_size: {size} differs from {first_group} ({group_size}); "
                "only one weight setting is supported"
            )
        targets += _string_list(group["targets"], f"{path}.targets")
    ignore = _string_list(cfg.get("ignore"), f"{ROOT}.ignore")
    assert group_size is not None
    return Int4GroupScheme(
        group_size=group_size, targets=tuple(dict.fromkeys(targets)), ignore=tuple(ignore)
    )


def _parse_group(group: Any, path: str) -> int:
    """Validate one config group; returns its group_size."""
    if not isinstance(group, dict):
        raise UnsupportedQuantization(f"{path}: expected a mapping, got {_show(group)}")
    if not _string_list(group.get("targets"), f"{path}.targets"):
        raise UnsupportedQuantization(f"{path}.targets: expected a non-empty list of targets")
    _expect(group, "format", path, ("pack-quantized", None), optional=True)
    weights_only = "weights-only quantization is supported"
    _expect(group, "input_activations", path, (None,), optional=True, why=weights_only)
    _expect(group, "output_activations", path, (None,), optional=True, why=weights_only)
    weights = group.get("weights")
    wpath = f"{path}.weights"
    if not isinstance(weights, dict):
        raise UnsupportedQuantization(f"{wpath}: expected a mapping, got {_show(weights)}")
    _expect(weights, "num_bits", wpath, (4,))
    _expect(weights, "type", wpath, ("int",))
    _expect(weights, "symmetric", wpath, (True,))
    _expect(weights, "strategy", wpath, ("group",))
    _expect(weights, "dynamic", wpath, (False,), optional=True)
    _expect(weights, "actorder", wpath, (None,), optional=True)
    _expect(weights, "block_structure", wpath, (None,), optional=True)
    size = _require(weights, "group_size", wpath)
    if not _is_pos_int(size):
        raise _unsupported(f"{wpath}.group_size", size, "a positive int")
    return int(size)


def _matches_target(target: str, name: str) -> bool:
    if target == "Linear":
        return not is_router_gate(name)
    return _matches_exact_entry(target, name)


def _matches_exact_entry(entry: str, name: str) -> bool:
    if entry.startswith(_REGEX_PREFIX):
        return re.match(entry[len(_REGEX_PREFIX):], name) is not None
    return entry == name


def _matches_component_entry(entry: str, name: str) -> bool:
    if entry.startswith(_REGEX_PREFIX):
        return re.match(entry[len(_REGEX_PREFIX):], name) is not None
    return f".{entry}." in f".{name}."


def _is_vocab_head(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last == "lm_head" or name == "shared_head.head" or name.endswith(".shared_head.head")


def _require(cfg: dict[str, Any], key: str, path: str) -> Any:
    if key not in cfg:
        raise UnsupportedQuantization(f"{path}.{key}: missing")
    return cfg[key]


def _expect(
    cfg: dict[str, Any],
    key: str,
    path: str,
    allowed: tuple[Any, ...],
    optional: bool = False,
    why: str = "",
) -> None:
    """Raise unless cfg[key] is one of `allowed`; types must match too (True is not 1).

    An absent key passes when `optional`."""
    if key not in cfg:
        if optional:
            return
        raise UnsupportedQuantization(f"{path}.{key}: missing")
    value = cfg[key]
    if not any(type(value) is type(a) and value == a for a in allowed):
        only = ", ".join(_show(a) for a in allowed)
        raise _unsupported(f"{path}.{key}", value, only, why)


def _string_list(value: Any, path: str) -> list[str]:
    """A list of module names / `re:` patterns (None means empty); regexes must compile."""
    if value is None:
        return []
    is_list = isinstance(value, (list, tuple))
    if not (is_list and all(isinstance(v, str) for v in value)):
        raise UnsupportedQuantization(f"{path}: expected a list of strings, got {_show(value)}")
    for i, entry in enumerate(value):
        if entry.startswith(_REGEX_PREFIX):
            try:
                re.compile(entry[len(_REGEX_PREFIX):])
            except re.error as err:
                raise UnsupportedQuantization(
                    f"{path}[{i}]: invalid regex {_show(entry)}: {err}"
                ) from None
    return list(value)


def _check_names(names: Any, where: str) -> tuple[str, ...]:
    """Module names / `re:` patterns as a tuple (a lone string would silently split into chars)."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where} must be a sequence of strings, got {names!r}")
    return tuple(names)


def _is_pos_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _show(value: Any) -> str:
    """A value as it reads in config.json (`8`, `"awq"`, `true`, `null`)."""
    return json.dumps(value, default=str)


def _unsupported(path: str, value: Any, only: str, why: str = "") -> UnsupportedQuantization:
    reason = f"; {why}" if why else ""
    return UnsupportedQuantization(f"{path}: {_show(value)} is not supported (only {only}){reason}")
