"""Rotary position embedding for MLA's decoupled rope dims: plain rope and static YaRN.

The published checkpoints lay the rope dims out as interleaved pairs (x0, x1), (x2, x3), ...,
each pair rotated by one frequency; `interleaved=False` selects the half-split layout instead.
The layout only has to agree between q and k: both are rotated here, and the cached k_pe keeps
the layout it was rotated in.
"""

from __future__ import annotations

import math

import torch

from moecluster.kernels.rope import rope, rope_reference
from moecluster.workers.config import RopeConfig


def rope_inv_freq(cfg: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies (dim // 2,), float32, YaRN-corrected when configured."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    pos_freqs = cfg.theta**exponents
    extrapolation = 1.0 / pos_freqs
    if cfg.kind == "default":
        return extrapolation
    interpolation = 1.0 / (cfg.factor * pos_freqs)
    original = cfg.original_max_position_embeddings
    assert original is not None

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp  # high-frequency dims keep their original frequency
    return interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin once per step for the batch's positions; `rotate` applies them."""

    def __init__(self, cfg: RopeConfig, dim: int) -> None:
        super().__init__()
        self.interleaved = cfg.interleaved
        self.scale = cfg.cos_sin_scale()
        self.register_buffer("inv_freq", rope_inv_freq(cfg, dim), persistent=False)  # (dim // 2,)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (tokens,) -> cos, sin (tokens, 1, dim // 2) in dtype."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        cos = (angles.cos() * self.scale).to(dtype).unsqueeze(1)
        sin = (angles.sin() * self.scale).to(dtype).unsqueeze(1)
        return cos, sin

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (tokens, heads, dim) -> rotated, same layout (one Triton launch on CUDA)."""
        if x.is_cuda:
            return rope(x, cos, sin, self.interleaved)
        return rope_reference(x, cos, sin, self.interleaved)
