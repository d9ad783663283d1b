"""Activations to FP8 e4m3 in row groups, for the W8A8 mode of the FP8 GEMMs (DeepSeek-V3's own
prefill recipe: activations in 1 x 128 groups, weights in 128 x 128 blocks, both e4m3 with fp32
scales, products accumulated in fp32 and scaled per K block), and when the GEMMs use that mode
(`w8a8_default`, `w8a16_only`).

`quantize_fp8_groups(x, group)`: x (rows, K) float -> q (rows, K) e4m3 and scale (rows,
ceil(K / group)) float32 with x ~= q * scale: each group of `group` consecutive values of a row
gets scale = max|x| / 448 (e4m3's largest finite value), an all-zero group the scale 1. One
Triton program per (row block, group); on CPU tensors without the interpreter, the torch
reference (the same arithmetic: x / scale rounded to e4m3 by the cast).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch

from moecluster.kernels.device import cuda_capability
from moecluster.kernels.jit import jit, uses_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is the whole implementation
    triton = None
    tl = None

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@jit(do_not_specialize=("rows",))
def _quant_kernel(
    x_ptr,  # (rows, K)
    q_ptr,  # (rows, K) e4m3 out
    s_ptr,  # (rows, G) float32 out
    rows,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    g = tl.program_id(1)
    offs_k = g * GROUP + tl.arange(0, GROUP)  # (GROUP,)
    mask = (offs_r < rows)[:, None] & (offs_k < K)[None, :]
    r64 = offs_r.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # (BLOCK_R,)
    # IEEE divisions (div_rn): Triton's `/` is an approximate division on the GPU, which would
    # move values across rounding boundaries of e4m3 against the torch reference.
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    v = tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0)  # (BLOCK_R, GROUP)
    # Round to the e4m3 grid in fp32 (to nearest even) so the cast below is exact: adding and
    # removing 2^(e + 20) keeps 3 mantissa bits of a value of exponent e (e >= -6: e4m3's
    # subnormal step 2^-9 below). Triton's interpreter truncates in the cast instead of rounding.
    e = tl.maximum((v.to(tl.int32, bitcast=True) >> 23) & 0xFF, 127 - 6)  # biased fp32 exponent
    c = ((e + 20) << 23).to(tl.float32, bitcast=True)  # 2^(exponent + 20)
    r = (tl.abs(v) + c) - c
    q = tl.where(v < 0, -r, r)
    tl.store(q_ptr + r64 * stride_qm + offs_k[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + offs_r.to(tl.int64) * stride_sm + g, scale, mask=offs_r < rows)


def quantize_fp8_groups_reference(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    rows, k = x.shape
    n_groups = -(-k // group)
    padded = torch.nn.functional.pad(x.float(), (0, n_groups * group - k)).view(rows, n_groups, group)
    amax = padded.abs().amax(dim=-1)  # (rows, G)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (padded / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rows, n_groups * group)[:, :k].contiguous(), scale


def dequantize_fp8_groups(q: torch.Tensor, scale: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """q * scale per row group -> (rows, K) in dtype (the W8A8 references' activations)."""
    k = q.shape[1]
    return (q.float() * scale.repeat_interleave(group, dim=1)[:, :k]).to(dtype)


def quantize_fp8_groups(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, K) -> (q e4m3 (rows, K), scale float32 (rows, ceil(K / group))), x ~= q * scale."""
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"quantize_fp8_groups: x must be a 2-D float tensor, got {x.dtype} {tuple(x.shape)}")
    if group < 16 or group & (group - 1):
        raise ValueError(f"quantize_fp8_groups: group must be a power of two >= 16, got {group}")
    if not uses_triton(x):
        return quantize_fp8_groups_reference(x, group)
    rows, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((rows, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, -(-k // group)), dtype=torch.float32, device=x.device)
    if rows:
        block_r = 16 if group <= 128 else 4
        _quant_kernel[(triton.cdiv(rows, block_r), scale.shape[1])](
            x, q, scale, rows, k, x.stride(0), q.stride(0), scale.stride(0), GROUP=group, BLOCK_R=block_r,
        )
    return q, scale


# ---- when the FP8 GEMMs run W8A8 ---------------------------------------------------------------
# Mean rows per expert (W8A8_MIN_ROWS) and rows of an FP8 linear (W8A8_LINEAR_MIN_ROWS) from
# which FP8 weights run W8A8 with 16-bit activations by default, and the rows from which linears
# run W8A8 inside the decode graphs with the engine's `decode_linears_w8a8`
# (W8A8_DECODE_LINEAR_MIN_ROWS). Experts: below 64 rows each they are
# weight-bandwidth bound and W8A16 (exact activations, no quantization pass) cost the same on an
# H100 (at 8 rows each); above, converting every e4m3 tile to bf16 made W8A16 1.8-3.1x slower
# (docs/performance.md, "W8A8"). Linears: from 128 rows W8A8 was 1.8-3.1x faster (256-16384 rows
# measured); at decode sizes, with the decode tiles of `w8a8_linear_tiles`, W8A8 beat
# W8A16 on an H100 and an H200 at 16-64 rows (DeepSeek-V3's eight linear shapes, graph-replayed,
# summed over a 3-layer slice's decode step at 64 rows: 0.58 ms against 0.93 on the H100, 0.50
# against 0.92 on the H200; docs/performance.md, "Dense FP8 linears at decode sizes, W8A8");
# below 16 rows and at 65-127 not measured. Outside the decode graphs (eager steps, prefill chunks)
# linears keep the 128-row threshold, so turning the option off restores W8A16 decode entirely.
W8A8_MIN_ROWS = 64
W8A8_LINEAR_MIN_ROWS = 128
W8A8_DECODE_LINEAR_MIN_ROWS = 16


_W8A8_BY_DEFAULT: ContextVar[bool] = ContextVar("moecluster_w8a8_by_default", default=True)
_EXPERTS_W8A8: ContextVar[bool] = ContextVar("moecluster_experts_w8a8", default=False)
_LINEARS_W8A8: ContextVar[bool] = ContextVar("moecluster_linears_w8a8", default=False)


@contextmanager
def w8a16_only(experts_w8a8: bool = False, linears_w8a8: bool = False) -> Iterator[None]:
    """Inside, FP8 weights run W8A16 unless a call asks for W8A8; with experts_w8a8, routed experts
    run W8A8 at any rows (`w8a8_experts_default`); with linears_w8a8, linears from
    W8A8_DECODE_LINEAR_MIN_ROWS rows (`w8a8_linear_default`). The decode CUDA graphs run both their
    warm-up pass and their capture inside it, so the two compile and launch the same kernels (a
    kernel first compiled during a capture would load a module there, which CUDA refuses), with
    the engine's `decode_experts_w8a8` and `decode_linears_w8a8`. W8A8 captures and replays equal
    to eager (tests/kernels/test_fused_moe_fp8.py::test_fp8_w8a8_captures_in_a_cuda_graph).
    Routed experts at decode sizes, graph-timed: W8A8 9-12% faster than W8A16 on an H200, within
    2% either way on an H100 (docs/performance.md, "FP8 GEMMs on the H200")."""
    tokens = _W8A8_BY_DEFAULT.set(False), _EXPERTS_W8A8.set(experts_w8a8), _LINEARS_W8A8.set(linears_w8a8)
    try:
        yield
    finally:
        _W8A8_BY_DEFAULT.reset(tokens[0])
        _EXPERTS_W8A8.reset(tokens[1])
        _LINEARS_W8A8.reset(tokens[2])


def _fp8_dot_device(x: torch.Tensor) -> bool:
    """e4m3 tensor-core dots with the W8A8 tiles' shared memory: Hopper (sm_90) or newer; the
    interpreter (CPU tensors) too."""
    return not x.is_cuda or cuda_capability(x.device) >= (9, 0)


def _w8a8_block(block_in: int) -> bool:
    return block_in >= 32 and block_in & (block_in - 1) == 0


def check_w8a8_block(where: str, block_in: int) -> None:
    if not _w8a8_block(block_in):
        raise ValueError(f"{where}: W8A8 needs the weights' scale block along K to be a power of two >= 32 "
                         f"(one e4m3 dot per block), got {block_in}")


def _w8a8_capable(x: torch.Tensor, block_in: int) -> bool:
    """16-bit activations, a power-of-two scale block along K, e4m3 dots on the device."""
    return _w8a8_block(block_in) and x.dtype in (torch.bfloat16, torch.float16) and _fp8_dot_device(x)


def w8a8_experts_default(rows_per_expert: float, x: torch.Tensor, *, block_in: int = 128) -> bool:
    """`w8a8_default` for routed experts: also at any rows inside `w8a16_only(experts_w8a8=True)`."""
    if _EXPERTS_W8A8.get():
        return _w8a8_capable(x, block_in)
    return w8a8_default(rows_per_expert, x, block_in=block_in)


def w8a8_linear_default(rows: int, x: torch.Tensor, *, block_in: int = 128) -> bool:
    """`w8a8_default` for an FP8 linear: from W8A8_LINEAR_MIN_ROWS rows; inside
    `w8a16_only(linears_w8a8=True)` from W8A8_DECODE_LINEAR_MIN_ROWS."""
    if _LINEARS_W8A8.get():
        return rows >= W8A8_DECODE_LINEAR_MIN_ROWS and _w8a8_capable(x, block_in)
    return w8a8_default(rows, x, W8A8_LINEAR_MIN_ROWS, block_in=block_in)


def w8a8_default(rows: float, x: torch.Tensor, min_rows: float = W8A8_MIN_ROWS, *, block_in: int = 128) -> bool:
    """Whether FP8 weights run W8A8 by default for activations like x: 16-bit, at least min_rows
    rows (per expert for the MoE), outside `w8a16_only`, on a Hopper-class GPU (or the
    interpreter); fp32 activations (the tests' exact mode) never, nor scale blocks along K that
    are not a power of two >= 32 (one e4m3 dot per block; the quantization groups)."""
    return rows >= min_rows and _W8A8_BY_DEFAULT.get() and _w8a8_capable(x, block_in)
