"""Token-to-expert dispatch and combine behind one small interface.

The MoE layer hands the dispatcher its tokens and their top-k choices; the dispatcher returns the
tokens its rank must run, grouped by local expert, and later turns the experts' outputs back into
one weighted sum per original token. `LocalDispatch` is the single-rank case (every expert is
local); the expert-parallel all-to-all implements the same interface.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Dispatched:
    tokens: torch.Tensor  # (routed, hidden) token copies sorted by local expert
    tokens_per_expert: torch.Tensor  # (local_experts,) int64 on tokens' device: rows of `tokens` per expert
    handle: object  # what combine needs to route results back


class Dispatcher(Protocol):
    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Dispatched: ...

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor: ...


def count_ids(
    ids: torch.Tensor, n: int, weight: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """ids (m,) in [0, n) -> (n,) int64 occurrences (each counted `weight[i]` times when given),
    on ids' device; added into `out` when given. Unlike torch.bincount on CUDA it never reads the
    ids back to the host, so a step that uses it needs no sync and can be captured in a CUDA graph."""
    counts = torch.zeros(n, dtype=torch.int64, device=ids.device) if out is None else out
    return counts.scatter_add_(0, ids.long(), torch.ones_like(ids, dtype=torch.int64) if weight is None else weight)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """order (n,) a permutation (sorted row -> pair) -> (n,) its inverse (pair -> sorted row)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


# ids (n,) -> (order: sorted row -> pair, stable; inverse: pair -> sorted row). The workers pass
# kernels.stable_argsort (one launch at decode sizes on GPUs); this module cannot import kernels.
ArgSort = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def argsort_with_inverse(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The default ArgSort: torch's stable argsort and a scatter for its inverse."""
    order = torch.argsort(ids, stable=True)
    return order, inverse_order(order)


def weighted_sum(rows: torch.Tensor, slot_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rows (pairs, H) in sorted order, slot_row (pairs,) each (token, choice) pair's row, weights
    (tokens, top_k) -> (tokens, H): each token's rows times its weights, added in fp32 by one
    batched GEMM and rounded once to rows' dtype (deterministic: no atomics)."""
    tokens, top_k = weights.shape
    per_token = rows[slot_row].view(tokens, top_k, rows.shape[1]).float()  # (tokens, top_k, H), choice order
    return torch.bmm(weights.float().unsqueeze(1), per_token).squeeze(1).to(rows.dtype)


@dataclass(frozen=True)
class _LocalHandle:
    slot_row: torch.Tensor  # (tokens * top_k,) sorted row of each (token, choice) slot
    weights: torch.Tensor  # (tokens, top_k) routing weights


class LocalDispatch:
    """All experts on this rank: sort (token, choice) pairs by expert, weight and sum back.

    combine gathers each token's top_k rows back into slot order and sums them times their
    weights in fp32 with one batched GEMM per token (deterministic, one rounding to the output
    dtype, as transformers' fp32 accumulation): no atomics (`index_add_` on 16-bit rows was
    about 27 us a layer at 64 tokens on an H200, and its order of additions varies run to run)."""

    def __init__(self, num_experts: int, argsort: ArgSort = argsort_with_inverse) -> None:
        self.num_experts = num_experts
        self.argsort = argsort

    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Dispatched:
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1)  # (tokens * top_k,)
        order, inverse = self.argsort(flat_ids)  # sorted row -> slot, slot -> sorted row
        handle = _LocalHandle(inverse, weights)
        return Dispatched(hidden[order // top_k], count_ids(flat_ids, self.num_experts), handle)

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        h = dispatched.handle
        assert isinstance(h, _LocalHandle)
        return weighted_sum(expert_out, h.slot_row, h.weights)
