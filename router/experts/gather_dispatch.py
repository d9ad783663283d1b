"""Expert-parallel dispatch with no host sync, for decode steps replayed from CUDA graphs.

`AllToAllDispatch` moves exactly the rows each rank needs, but its collectives need the counts on
the host (one sync per MoE layer), so it cannot be captured. Here every collective has a size
known from the batch alone:

  1. all_gather the group's tokens, expert ids and routing weights: every rank sees the whole
     group's batch (world * T rows); every rank must call with the same T (a graph's padded size);
  2. each rank picks the (token, choice) pairs that fall on its own slots (the same replica rule
     as `AllToAllDispatch`, computed identically on every rank, so each pair runs exactly once),
     groups them by local slot (pairs of other ranks sort past the end and are not counted);
  3. combine weights each pair's output, sums per gathered token in fp32, and a reduce-scatter
     sums the ranks' partial sums and leaves each rank its own T tokens.

Bytes: every token reaches every rank. With top-8 routing over 2 ranks nearly every token needs
both anyway; over 8 ranks a token reaches about 5.3 of them, so this sends ~1.5x the minimum.
For decode batches that is a few MB per layer, cheaper than the host syncs it removes.

The placement tables live in fixed-shape device tensors updated in place (`set_placement`), so a
graph captured once keeps working after EPLB moves experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moecluster.router.experts.all_to_all import pick_slots, replica_tables
from moecluster.router.experts.dispatch import ArgSort, Dispatched, argsort_with_inverse, count_ids
from moecluster.router.experts.placement import ExpertPlacement


@dataclass(frozen=True)
class _GatherHandle:
    order: torch.Tensor  # (world * T * top_k,) flat gathered pair index of each grouped row
    weight: torch.Tensor  # (world * T * top_k,) fp32 routing weight of each grouped row
    valid: torch.Tensor  # (world * T * top_k,) bool, grouped rows this rank computed
    num_tokens: int  # T, this rank's tokens
    top_k: int


class GatherDispatch:
    def __init__(self, placement: ExpertPlacement, rank: int, group: Any = None,
                 device: torch.device | str = "cpu", argsort: ArgSort = argsort_with_inverse) -> None:
        self.rank, self.group = rank, group
        self.argsort = argsort
        self.world, self.slots_per_rank = placement.num_ranks, placement.slots_per_rank
        experts = len(placement.log2phy)
        widest = self.world * self.slots_per_rank - experts + 1  # every spare slot on one expert
        self.slot_table = torch.zeros((experts, widest), dtype=torch.int64, device=device)
        self.num_replicas = torch.ones(experts, dtype=torch.int64, device=device)
        self.set_placement(placement)
        self.gloo = dist.get_backend(group) == "gloo"

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Point at a new placement of the same shape, in place (captured graphs read these tensors)."""
        if (placement.num_ranks, placement.slots_per_rank) != (self.world, self.slots_per_rank):
            raise ValueError("a placement of another shape needs a new GatherDispatch")
        table, counts = replica_tables(placement, self.slot_table.shape[1])
        self.slot_table.copy_(table)
        self.num_replicas.copy_(counts)

    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Dispatched:
        """hidden (T, H), expert_ids / weights (T, top_k) -> this rank's pairs of the whole group's
        batch, grouped by local slot; (world * T * top_k) rows, those past the counts unused."""
        num_tokens, top_k = expert_ids.shape
        tokens = self._gather(hidden)  # (world * T, H)
        ids = self._gather(expert_ids.to(torch.int64))  # (world * T, top_k)
        w = self._gather(weights.float())  # (world * T, top_k)
        flat = ids.reshape(-1)  # (pairs,) pair p = gathered token p // top_k, choice p % top_k
        slot = pick_slots(flat, self.slot_table, self.num_replicas, num_tokens * top_k)  # (pairs,) physical slots
        mine = slot // self.slots_per_rank == self.rank
        local = torch.where(mine, slot % self.slots_per_rank, self.slots_per_rank)  # others: one bin past the end
        order, _ = self.argsort(local)  # stable: pairs of one slot keep the gathered order
        counts = count_ids(local, self.slots_per_rank + 1)[:-1]
        handle = _GatherHandle(order, w.reshape(-1)[order], mine[order], num_tokens, top_k)
        return Dispatched(tokens[order // top_k], counts, handle)

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """expert_out (pairs, H) in grouped order (rows past the counts may hold anything) -> (T, H)."""
        h = dispatched.handle
        assert isinstance(h, _GatherHandle)
        weighted = torch.where(h.valid[:, None], expert_out.float() * h.weight[:, None], 0.0)  # (pairs, H) fp32
        partial = weighted.new_zeros(self.world * h.num_tokens, expert_out.shape[1])
        partial.index_add_(0, h.order // h.top_k, weighted)  # this rank's experts' share of every token
        if self.gloo:  # gloo has no reduce-scatter of tensors: reduce everywhere, keep our rows
            dist.all_reduce(partial, group=self.group)
            mine = partial[self.rank * h.num_tokens : (self.rank + 1) * h.num_tokens]
        else:
            mine = partial.new_empty(h.num_tokens, expert_out.shape[1])
            dist.reduce_scatter_tensor(mine, partial, group=self.group)
        return mine.to(expert_out.dtype)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """(T, ...) from every rank -> (world * T, ...), rank order."""
        t = t.contiguous()
        wire = t.view(torch.float16) if self.gloo and t.dtype == torch.bfloat16 else t  # gloo has no bfloat16
        out = wire.new_empty((self.world * t.shape[0], *t.shape[1:]))
        dist.all_gather_into_tensor(out, wire, group=self.group)
        return out.view(t.dtype) if wire is not t else out
