"""bf16 experts at prefill sizes through torch's grouped GEMM (`torch._grouped_mm`, CUTLASS on Hopper).

At hundreds of rows per expert the expert MLP is bound by tensor-core throughput. At 512 rows per
expert on an H100 the grouped GEMM that torch ships for Hopper was 15% faster than our Triton
kernel, and at 4096 even with it (`MIN_ROWS_PER_EXPERT`). The rule reads rows / E: where the rows
include some of no local expert (a gather dispatch under expert parallelism) it overstates the
load, which costs speed, not correctness. From there `grouped_mlp` runs, for bf16
`DenseExperts` with default tiles:

    g = x @ gate^T, u = x @ up^T        (two grouped GEMMs, rows grouped by expert)
    h = silu(g) * u                      (one Triton pass, below)
    out = h @ down^T                     (a third grouped GEMM)

The Triton kernel keeps the decode sizes, where it is faster, and every call with explicit tiles
or an `out` buffer. The rows of one expert sit together as `grouped_mlp` takes them; with
`src_rows` they are gathered first (one copy).
"""

from __future__ import annotations

import torch

from moecluster.kernels.device import cuda_capability
from moecluster.kernels.jit import jit
from moecluster.kernels.moe_weights import DenseExperts

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU reference path needs no Triton
    triton = None

# Rows per expert from which the grouped GEMM path runs, from `scripts/time_bf16_moe_paths.py` on an
# H100 (`docs/results/bf16-moe-paths-h100.json`, DeepSeek-V3 shapes, 32 experts): the path against
# the Triton kernel 1.594 / 1.451 ms at 256 rows, 2.298 / 2.159 at 384, 2.335 / 2.757 at 512,
# 19.38 / 18.51 at 4096 (the bench table of the same call: 18.76 / 18.69). One run, and the
# lent H100's times move by several percent between runs: the rule is "512 and up", not a tuned
# crossover.
MIN_ROWS_PER_EXPERT = 512


def supported(x: torch.Tensor, weights: DenseExperts, rows: int) -> bool:
    """Whether `grouped_mlp` takes this bf16 GEMM pair here (else the Triton kernel does)."""
    ws = (weights.gate, weights.up, weights.down)
    return (
        rows >= MIN_ROWS_PER_EXPERT * weights.num_experts  # first: decode sizes stop here
        and hasattr(torch, "_grouped_mm")
        and triton is not None
        and x.is_cuda
        and torch.version.hip is None
        # Hopper / Blackwell datacenter parts: elsewhere torch loops over the groups on the host
        and cuda_capability(x.device)[0] in (9, 10)
        and not torch.cuda.is_current_stream_capturing()  # (decode graphs stay on the Triton kernel)
        and x.dtype == torch.bfloat16
        and all(w.dtype == torch.bfloat16 for w in ws)
        and weights.hidden % 8 == 0 and weights.intermediate % 8 == 0  # 16-byte strides
        and x.stride(1) == 1 and all(w.stride(2) == 1 for w in ws)
    )


def grouped_mlp(x: torch.Tensor, src_rows: torch.Tensor | None, counts: torch.Tensor, weights: DenseExperts) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) -> (rows, H), rows grouped by expert as `counts` (E,) says; rows past
    sum(counts) hold unspecified values (`grouped_mlp` takes this path only for an output of its own)."""
    a = x if src_rows is None else x.index_select(0, src_rows)  # (rows, H), experts' rows together
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # (E,) end row of each expert
    g = torch._grouped_mm(a, weights.gate.transpose(1, 2), offs=offs)  # (rows, I)
    u = torch._grouped_mm(a, weights.up.transpose(1, 2), offs=offs)  # (rows, I)
    h = silu_and_mul(g, u)  # (rows, I)
    return torch._grouped_mm(h, weights.down.transpose(1, 2), offs=offs)  # (rows, H)


def silu_and_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for two contiguous (rows, I) tensors in one pass, computed in fp32."""
    if g.shape != u.shape or g.ndim != 2 or not (g.is_contiguous() and u.is_contiguous()):
        raise ValueError(f"silu_and_mul: two contiguous (rows, I) tensors expected, got {tuple(g.shape)} and {tuple(u.shape)}")
    h = torch.empty_like(g)
    n = g.numel()
    if n:
        block = 2048
        _silu_and_mul_kernel[(triton.cdiv(n, block),)](g, u, h, n, BLOCK=block, num_warps=8)
    return h


if triton is not None:

    @jit(do_not_specialize=("n",))
    def _silu_and_mul_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask).to(tl.float32)
        tl.store(h_ptr + offs, (g / (1.0 + tl.exp(-g)) * u).to(h_ptr.dtype.element_ty), mask=mask)
