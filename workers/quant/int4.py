"""compressed-tensors `pack-quantized` INT4 weights, as shipped by Kimi-K2-Thinking.

Symmetric, one scale per `group_size` consecutive inputs, no zero point. On disk:
  `weight_packed` int32        (out, in // 8)
  `weight_scale`  bf16         (out, in // group_size)
  `weight_shape`  int32/int64  (2,) = [out, in]
Each int32 word holds 8 consecutive input values q in [-8, 7], stored as the unsigned nibble
q + 8; value k of a word sits at bits 4k..4k+3 (the first value in the lowest bits). Words with
a top nibble >= 8 are negative as int32. The real weight is `w[i, j] = q[i, j] * scale[i, j // g]`.

All functions also take leading batch dims, e.g. stacked experts (E, out, in).
"""

from __future__ import annotations

import torch
from torch import Tensor

INT4_MIN, INT4_MAX = -8, 7
VALUES_PER_WORD = 8  # 32 bits / 4 bits
DEFAULT_GROUP_SIZE = 32
_OFFSET = 8  # q + 8 maps [-8, 7] onto the unsigned nibble range [0, 15]


def pack_int4(q: Tensor) -> Tensor:
    """Pack int8 values in [-8, 7] of shape (..., out, in) into int32 words (..., out, in // 8)."""
    if q.dtype != torch.int8 or q.ndim < 1:
        raise ValueError(
            f"pack_int4: expected an int8 tensor (..., in), got {q.dtype} {tuple(q.shape)}"
        )
    in_f = q.shape[-1]
    _check_divisible(in_f, VALUES_PER_WORD, "pack_int4", "values per int32 word", tuple(q.shape))
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(
            f"pack_int4: values must lie in [{INT4_MIN}, {INT4_MAX}], "
            f"got [{int(q.min())}, {int(q.max())}]"
        )
    # int64 so that a nibble >= 8 shifted by 28 cannot overflow; bit fields are disjoint: sum == or.
    nibbles = (q.to(torch.int64) + _OFFSET).reshape(
        *q.shape[:-1], in_f // VALUES_PER_WORD, VALUES_PER_WORD
    )  # (..., in // 8, 8)
    words = (nibbles << _shifts(q.device, torch.int64)).sum(dim=-1)  # (..., in // 8), in [0, 2**32)
    # Reinterpret as two's complement int32: words with the top bit set become negative.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of pack_int4: int32 (..., out, in // 8) -> int8 (..., out, in) in [-8, 7]."""
    if packed.dtype != torch.int32 or packed.ndim < 1:
        raise ValueError(
            f"unpack_int4: expected an int32 tensor (..., in // 8), "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    shape = tuple(packed.shape)
    _check_divisible(in_features, VALUES_PER_WORD, "unpack_int4", "values per int32 word", shape)
    if packed.shape[-1] * VALUES_PER_WORD != in_features:
        raise ValueError(
            f"unpack_int4: packed shape {shape} holds {shape[-1] * VALUES_PER_WORD} values "
            f"per row, expected in_features={in_features}"
        )
    # Arithmetic right shift keeps bits 4k..4k+3 in the low nibble even for negative words; the mask
    # drops the sign extension.
    shifts = _shifts(packed.device, torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # (..., in // 8, 8)
    return (nibbles - _OFFSET).to(torch.int8).reshape(*packed.shape[:-1], in_features)


def quantize_int4_group(
    w: Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize (..., out, in) to (weight_packed, weight_scale, weight_shape).

    Rule: scale = amax / 7 per group, rounded to scale_dtype first, then
    q = clamp(round_half_even(w / scale), -8, 7). The group's extreme maps to +-7, so the rounding
    error is at most scale / 2 and -8 is never produced (a symmetric grid). All-zero groups get
    scale 1. weight_shape is the per-matrix [out, in] as int32, shared by all leading dims.
    """
    if w.ndim < 2 or not w.is_floating_point():
        raise ValueError(
            f"quantize_int4_group: expected a float tensor (..., out, in), "
            f"got {w.dtype} {tuple(w.shape)}"
        )
    *lead, out_f, in_f = w.shape
    _check_int4_dims(in_f, group_size, "quantize_int4_group", tuple(w.shape))
    w32 = w.float()
    if not torch.isfinite(w32).all():
        raise ValueError("quantize_int4_group: weight has inf or nan values")
    groups = w32.reshape(*lead, out_f, in_f // group_size, group_size)  # (..., out, in // g, g)
    amax = groups.abs().amax(dim=-1)  # (..., out, in // g)
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax)).to(scale_dtype)
    if not torch.isfinite(scale).all() or (scale == 0).any():
        raise ValueError(f"quantize_int4_group: group scales under- or overflow {scale_dtype}")
    # Divide by the stored (rounded) scale so dequantization reproduces exactly what we chose.
    q = torch.round(groups / scale.float().unsqueeze(-1)).clamp(INT4_MIN, INT4_MAX)
    packed = pack_int4(q.to(torch.int8).reshape(w.shape))  # (..., out, in // 8)
    shape = torch.tensor([out_f, in_f], dtype=torch.int32, device=w.device)
    return packed, scale, shape


def dequantize_int4_group(
    packed: Tensor,
    scale: Tensor,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """packed (..., out, in // 8), scale (..., out, in // g) -> (..., out, in).

    Computes q * scale in float32, then casts to dtype.
    """
    _check_int4_dims(in_features, group_size, "dequantize_int4_group", tuple(packed.shape))
    expected = (*packed.shape[:-1], in_features // group_size)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"dequantize_int4_group: weight_scale shape {tuple(scale.shape)} does not match "
            f"packed {tuple(packed.shape)} with in_features={in_features}, "
            f"group_size={group_size}: expected {expected}"
        )
    q = unpack_int4(packed, in_features)  # (..., out, in)
    groups = q.float().reshape(*expected, group_size)  # (..., out, in // g, g)
    return (groups * scale.float().unsqueeze(-1)).reshape(q.shape).to(dtype)


def _shifts(device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.arange(0, 32, 4, dtype=dtype, device=device)  # (8,) bit offset of value k


def _check_int4_dims(in_features: int, group_size: int, where: str, shape: tuple[int, ...]) -> None:
    if group_size <= 0:
        raise ValueError(f"{where}: group_size must be positive, got {group_size}")
    _check_divisible(in_features, VALUES_PER_WORD, where, "values per int32 word", shape)
    _check_divisible(in_features, group_size, where, "group_size", shape)


def _check_divisible(
    in_features: int, divisor: int, where: str, what: str, shape: tuple[int, ...]
) -> None:
    if in_features % divisor != 0:
        raise ValueError(
            f"{where}: in_features={in_features} (tensor shape {shape}) must be a multiple of "
            f"{divisor} ({what})"
        )
