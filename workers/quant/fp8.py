"""DeepSeek-V3 block FP8 weights (`quant_method: "fp8"`, `fmt: "e4m3"`, `weight_block_size`).

On disk a quantized linear holds two tensors:
  `weight`           torch.float8_e4m3fn  (out, in)
  `weight_scale_inv` float32              (ceil(out / bo), ceil(in / bi))
and the real weight is `w[i, j] = float(weight[i, j]) * weight_scale_inv[i // bo, j // bi]`.
Despite its name, `weight_scale_inv` multiplies: it is the inverse of the scale that was divided
in at quantization time. Edge blocks are partial when a dim is not a multiple of the block.

Both functions also take leading batch dims, e.g. stacked experts (E, out, in) with scales
(E, ceil(out / bo), ceil(in / bi)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
DEFAULT_BLOCK = (128, 128)


def fp8_scale_shape(out_features: int, in_features: int, block: tuple[int, int]) -> tuple[int, int]:
    """Shape of `weight_scale_inv` for an (out, in) weight: one scale per (partial) block."""
    bo, bi = _check_block(block)
    return math.ceil(out_features / bo), math.ceil(in_features / bi)


def quantize_fp8_block(w: Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """Quantize (..., out, in) to (e4m3 weight (..., out, in), float32 scale_inv (..., nbo, nbi)).

    Each block's absolute max maps to 448 (the e4m3 max); an all-zero block gets scale 1.
    """
    bo, bi = _check_block(block)
    if w.ndim < 2 or not w.is_floating_point():
        raise ValueError(
            f"quantize_fp8_block: expected a float tensor (..., out, in), "
            f"got {w.dtype} {tuple(w.shape)}"
        )
    w32 = w.float()
    if not torch.isfinite(w32).all():
        raise ValueError("quantize_fp8_block: weight has inf or nan values")
    *lead, out_f, in_f = w32.shape
    nbo, nbi = fp8_scale_shape(out_f, in_f, block)
    # Zero-pad to whole blocks so every block is a full (bo, bi) tile; padding never raises amax.
    padded = F.pad(w32, (0, nbi * bi - in_f, 0, nbo * bo - out_f))  # (..., nbo * bo, nbi * bi)
    tiles = padded.reshape(*lead, nbo, bo, nbi, bi)  # (..., nbo, bo, nbi, bi)
    amax = tiles.abs().amax(dim=(-3, -1))  # (..., nbo, nbi)
    scale_inv = amax / FP8_E4M3_MAX
    # All-zero blocks (and blocks so tiny the division underflows) get scale 1: they quantize to 0.
    scale_inv = torch.where(scale_inv > 0, scale_inv, torch.ones_like(scale_inv))
    q = tiles / scale_inv[..., :, None, :, None]  # (..., nbo, bo, nbi, bi)
    # The block max can land a rounding step above 448; e4m3fn has no inf, so clamp before casting.
    q = q.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).reshape(*lead, nbo * bo, nbi * bi)[..., :out_f, :in_f]
    return q.to(FP8_DTYPE).contiguous(), scale_inv.contiguous()


def dequantize_fp8_block(
    weight: Tensor,
    scale_inv: Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """(..., out, in) e4m3 weight times its per-block scale_inv, in float32, then cast to dtype."""
    bo, bi = _check_block(block)
    if weight.ndim < 2 or weight.dtype != FP8_DTYPE:
        raise ValueError(
            f"dequantize_fp8_block: expected a {FP8_DTYPE} weight (..., out, in), "
            f"got {weight.dtype} {tuple(weight.shape)}"
        )
    *lead, out_f, in_f = weight.shape
    expected = (*lead, *fp8_scale_shape(out_f, in_f, block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"dequantize_fp8_block: weight_scale_inv shape {tuple(scale_inv.shape)} does not match "
            f"weight {tuple(weight.shape)} with block {(bo, bi)}: expected {expected}"
        )
    # (..., nbo * bo, nbi * bi) -> (..., out, in): one scale per element, edge blocks cut short.
    scale = scale_inv.float().repeat_interleave(bo, dim=-2).repeat_interleave(bi, dim=-1)
    return (weight.float() * scale[..., :out_f, :in_f]).to(dtype)


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    ok = all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    if len(block) != 2 or not ok:
        raise ValueError(f"fp8 block must be two positive ints (out, in), got {block!r}")
    return int(block[0]), int(block[1])
