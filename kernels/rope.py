"""Rotary embedding of MLA's rope dims in one launch (GPU): x (tokens, heads, dim) rotated by
cos / sin (tokens, dim // 2), pairs interleaved ((x0, x1), (x2, x3), ...: the published
checkpoints) or split in halves. Computed in fp32 and rounded once to x's dtype; the torch form
(`rope_reference`, what transformers computes) rounds each product and the sum to x's dtype, so
in bf16 the two differ by one unit in the last place in some values (about a quarter at random
inputs on an H200: the compiler also fuses the products into FMAs, so rounding each product in
the kernel did not reproduce the torch form either). The torch form is eight launches a rotation
(two products, a difference, a strided copy, twice). One program per token and block of up to
`HEAD_BLOCK` heads (one per token and all 128 heads took about 9 us at 64 tokens on an H200).
"""

from __future__ import annotations

import torch

from moecluster.kernels.jit import jit, triton, uses_triton

if triton is not None:
    import triton.language as tl

HEAD_BLOCK = 16  # heads per program


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (tokens, heads, dim); cos, sin broadcastable to (tokens, heads, dim // 2) -> rotated x."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x2 * cos + x1 * sin
        return out
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, heads, stride_xt, stride_xh, stride_yt, stride_yh, stride_ct, stride_st,
                 HALF: tl.constexpr, HEADS: tl.constexpr, INTERLEAVED: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)[:, None]
    i = tl.arange(0, HALF)[None, :]
    inside = h < heads
    if INTERLEAVED:
        i1, i2 = 2 * i, 2 * i + 1
    else:
        i1, i2 = i, i + HALF
    x1 = tl.load(x_ptr + t * stride_xt + h * stride_xh + i1, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + t * stride_xt + h * stride_xh + i2, mask=inside, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * stride_ct + i).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_st + i).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    tl.store(y_ptr + t * stride_yt + h * stride_yh + i1, (x1 * c - x2 * s).to(dt), mask=inside)
    tl.store(y_ptr + t * stride_yt + h * stride_yh + i2, (x2 * c + x1 * s).to(dt), mask=inside)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (tokens, heads, dim) with unit stride along dim; cos, sin (tokens, 1, dim // 2) or
    (tokens, dim // 2) in x's dtype -> rotated x (a new contiguous tensor): `rope_reference` in
    fp32, rounded once. Triton on CUDA, the reference elsewhere."""
    if x.ndim != 3 or x.shape[-1] % 2:
        raise ValueError(f"rope: x must be (tokens, heads, even dim), got {tuple(x.shape)}")
    tokens, heads, dim = x.shape
    half = dim // 2
    if tokens == 0:  # an expert-parallel rank with no work still runs the layer on an empty batch
        return rope_reference(x, cos, sin, interleaved)
    c, s = cos.flatten(1), sin.flatten(1)
    if c.shape != (tokens, half) or s.shape != (tokens, half):
        raise ValueError(f"rope: cos and sin must be ({tokens}, {half}) per token, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if (not uses_triton(x) or x.numel() == 0 or half & (half - 1) or x.stride(-1) != 1
            or c.dtype != x.dtype or s.dtype != x.dtype or c.stride(-1) != 1 or s.stride(-1) != 1):
        return rope_reference(x, cos, sin, interleaved)
    y = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    block = min(HEAD_BLOCK, triton.next_power_of_2(heads))
    _rope_kernel[(tokens, triton.cdiv(heads, block))](
        x, c, s, y, heads, x.stride(0), x.stride(1), y.stride(0), y.stride(1), c.stride(0), s.stride(0),
        HALF=half, HEADS=block, INTERLEAVED=interleaved)
    return y
