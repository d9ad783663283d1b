"""`fp8_linear`: DeepSeek-V3's dense FP8 layers (attention projections, dense MLPs, shared
experts) as the fused MoE GEMM kernel with one expert, W8A16 or W8A8, with K split over programs
at decode sizes (fp32 partials summed and rounded by `_sum_splits_kernel`). Tiles and split
counts: kernels/moe_tiles.py (`linear_tiles`, `w8a8_linear_tiles`, `linear_split_k`).
"""

from __future__ import annotations

import torch

from moecluster.kernels.device import cuda_sm_count
from moecluster.kernels.fp8_quant import check_w8a8_block, quantize_fp8_groups, w8a8_linear_default
from moecluster.kernels.fused_moe_ref import fp8_round_trip
from moecluster.kernels.jit import jit, uses_triton
from moecluster.kernels.moe_gemm import _moe_gemm_kernel, tl, triton
from moecluster.kernels.moe_tiles import (
    W8A8_SHORT_K_STEPS,
    TileConfig,
    fp32_tiles,
    linear_split_k,
    linear_tiles,
    w8a8_linear_tiles,
)
from moecluster.kernels.moe_weights import _FLOAT_DTYPES, _MIN_DOT, _desc, dequantize_fp8


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    *,
    tiles: TileConfig | None = None,
    fp8_activations: bool | None = None,
) -> torch.Tensor:
    """x (rows, K) @ W^T with W = e4m3 weight (N, K) x its (ceil(N/bo), ceil(K/bi)) block scales
    -> (rows, N) in x's dtype: the GEMM for DeepSeek-V3's dense FP8 layers (attention
    projections, dense MLPs, shared experts), the MoE GEMM kernel with one expert. W8A16, or W8A8
    (x quantized per (row, bi group)) when fp8_activations, None = `w8a8_linear_default(rows)`."""
    if x.ndim != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"fp8_linear: x must be (rows, K) bf16/fp16/fp32, got {_desc(x)}")
    n, k = weight.shape
    bo, bi = block
    if weight.dtype != torch.float8_e4m3fn or x.shape[1] != k:
        raise ValueError(f"fp8_linear: weight must be float8_e4m3fn (N, {x.shape[1]}), got {_desc(weight)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (-(-n // bo), -(-k // bi)):
        raise ValueError(f"fp8_linear: scale must be float32 {(-(-n // bo), -(-k // bi))}, got {_desc(scale)}")
    rows = x.shape[0]
    w8a8 = w8a8_linear_default(rows, x, block_in=bi) if fp8_activations is None else fp8_activations
    if w8a8:
        check_w8a8_block("fp8_linear", bi)
    if tiles is not None and tiles.split_k < 0:
        raise ValueError(f"fp8_linear: split_k must be >= 0 (0 = chosen by the grid), got {tiles.split_k}")
    if rows == 0 or not uses_triton(x):
        if w8a8:
            return (fp8_round_trip(x, bi) @ dequantize_fp8(weight, scale, block, torch.float32).T).to(x.dtype)
        return x @ dequantize_fp8(weight, scale, block, x.dtype).T
    waves = 0.0  # split K only where the tiles say (up to 64 rows, where it was measured)
    if tiles is None and w8a8:
        tiles, waves = w8a8_linear_tiles(rows)
    elif tiles is None:
        tiles, waves = linear_tiles(rows)
        if x.dtype == torch.float32:
            tiles = fp32_tiles(tiles, False)
    bm, bn = tiles.block_m, tiles.block_n
    bk = min(tiles.block_k or 64, bi)
    if bk < _MIN_DOT or bk & (bk - 1) or bi % bk:
        raise ValueError(f"fp8_linear: block_k must be a power of two >= {_MIN_DOT} dividing {bi}, got {bk}")
    counts = torch.full((1,), rows, dtype=torch.int32, device=x.device)
    n_mblocks = triton.cdiv(rows, bm)
    programs = n_mblocks * triton.cdiv(n, bn)
    k_steps = triton.cdiv(k, bk)
    short_k = W8A8_SHORT_K_STEPS if w8a8 else 0
    split = tiles.split_k or (linear_split_k(programs, k_steps, cuda_sm_count(x.device), waves, short_k=short_k)
                              if x.is_cuda and waves else 1)
    k_split = triton.cdiv(k_steps, min(split, k_steps)) * bk  # whole K steps per split
    split = triton.cdiv(k, k_split)  # none empty
    # One split writes the output; several write fp32 partials (split, rows, N), added after.
    out = (torch.empty((rows, n), dtype=x.dtype, device=x.device) if split == 1
           else torch.empty((split, rows, n), dtype=torch.float32, device=x.device))
    a, a_scale = quantize_fp8_groups(x, bi) if w8a8 else (x, None)  # (rows, K) e4m3, (rows, K / bi)
    _moe_gemm_kernel[(programs, split)](
        a, counts, counts, weight, scale, weight, scale, a_scale if w8a8 else counts, out,
        rows, n_mblocks, 1, n, k,
        a.stride(0), a.stride(1),
        0, weight.stride(1), weight.stride(0),
        0, scale.stride(1), scale.stride(0),
        *(a_scale.stride() if w8a8 else (0, 0)),
        out.stride(-2), out.stride(-1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=2,
        GATED=False, GATHER=False, INT4=False, INT4_STACK=1, GROUP=1, SUB_K=_MIN_DOT, MAGIC_BITS=0, MAGIC_BIAS=0.0, DEQ_PTX=False,
        EVEN_K=(k % bk == 0), IEEE=(x.dtype == torch.float32), FP8=True, FP8_BN=bo, FP8_BK=bi,
        GROUP_M=tiles.group_m, A_FP8=w8a8, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        SPLIT_K=split > 1, k_split=k_split, stride_cs=out.stride(0) if split > 1 else 0,
    )  # fmt: skip
    if split == 1:
        return out
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(rows * n, block),)](out, y, rows * n, split, out.stride(0), BLOCK=block)
    return y


@jit(do_not_specialize=("n_elem",))
def _sum_splits_kernel(p_ptr, y_ptr, n_elem, split, stride_s, BLOCK: tl.constexpr):
    """y = sum over the split axis of fp32 partials p (split, n_elem), rounded once to y's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elem
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = p_ptr + offs  # advanced split by split: 64-bit pointer arithmetic, no int32 product
    for _ in range(split):
        acc += tl.load(ptrs, mask=inside, other=0.0)
        ptrs += stride_s
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=inside)
