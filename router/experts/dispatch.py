"""Token-to-expert dispatch and combine behind one small interface.

The MoE layer hands the dispatcher its tokens and their top-k choices; the dispatcher returns the
tokens its rank must run, grouped by local expert, and later turns the experts' outputs back into
one weighted sum per original token. `LocalDispatch` is the single-rank case (every expert is
local); the expert-parallel all-to-all implements the same interface.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class _LocalHandle:
    token_index: torch.Tensor  # (routed,) original token of each sorted row
    weight: torch.Tensor  # (routed,) routing weight of each sorted row
    num_tokens: int


class LocalDispatch:
    """All experts on this rank: sort (token, choice) pairs by expert, weight and sum back."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Dispatched:
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1)  # (tokens * top_k,)
        order = torch.argsort(flat_ids, stable=True)
        token_index = order // top_k
        handle = _LocalHandle(token_index, weights.reshape(-1)[order], hidden.shape[0])
        return Dispatched(hidden[token_index], count_ids(flat_ids, self.num_experts), handle)

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        h = dispatched.handle
        assert isinstance(h, _LocalHandle)
        weighted = (expert_out.float() * h.weight[:, None]).to(expert_out.dtype)
        out = expert_out.new_zeros(h.num_tokens, expert_out.shape[1])
        return out.index_add_(0, h.token_index, weighted)
