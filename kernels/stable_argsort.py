"""Stable argsort of a decode step's expert (or slot) ids in one launch (GPU).

The MoE dispatchers group a step's (token, choice) pairs by expert with a stable argsort and also
need its inverse (each pair's row in the grouped order). On CUDA, `torch.argsort(stable=True)`
of 512 ids is a radix sort of about 27 us (H200, a 61-layer rank proxy's profile: 1.6 ms of a
35 ms decode step) and the inverse a scatter after it. Here each pair's rank is counted
directly: the pairs before it in (id, index) order, a comparison against every other pair, so
the work grows with the square of the pairs. One launch writes both the order (grouped row ->
pair) and its inverse. Up to `MAX_PAIRS` pairs (a decode batch: 512 sequences x top-8 on one
rank, 4096 gathered pairs at EP=8 and 64 sequences a rank); above it, and on the CPU, the torch
reference runs (a prefill chunk of 8192 tokens has 65,536 pairs).
"""

from __future__ import annotations

import torch

from moecluster.kernels.jit import jit, triton, uses_triton

if triton is not None:
    import triton.language as tl

MAX_PAIRS = 8192
BLOCK_I, BLOCK_J = 64, 128  # pairs ranked per program, pairs compared per loop step


def stable_argsort_reference(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (n,) -> (order (n,) int64: sorted row -> index, stable; inverse (n,) int64: index -> row)."""
    order = torch.argsort(ids, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=ids.device))
    return order, inverse


@jit(do_not_specialize=("n",))
def _rank_kernel(ids_ptr, order_ptr, inverse_ptr, n, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    inside_i = i < n
    key_i = tl.load(ids_ptr + i, mask=inside_i, other=0)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for start in range(0, n, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        key_j = tl.load(ids_ptr + j, mask=j < n, other=0)
        before = (key_j[None, :] < key_i[:, None]) | ((key_j[None, :] == key_i[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((before & (j[None, :] < n)).to(tl.int32), axis=1)
    tl.store(inverse_ptr + i, rank.to(tl.int64), mask=inside_i)
    tl.store(order_ptr + rank, i.to(tl.int64), mask=inside_i)


def stable_argsort(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (n,) integer keys -> (order, inverse) as `stable_argsort_reference`, in one launch on
    CUDA for n <= MAX_PAIRS (no host sync: capturable in a decode graph)."""
    n = ids.numel()
    if not uses_triton(ids) or n == 0 or n > MAX_PAIRS or ids.dim() != 1:
        return stable_argsort_reference(ids)
    ids = ids.contiguous()
    order = torch.empty(n, dtype=torch.int64, device=ids.device)
    inverse = torch.empty_like(order)
    _rank_kernel[(triton.cdiv(n, BLOCK_I),)](ids, order, inverse, n, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J)
    return order, inverse
