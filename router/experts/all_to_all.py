"""Expert-parallel dispatch: token copies travel to the ranks that hold their experts and back.

Each (token, choice) pair is sent to one physical slot of its logical expert: with replicas, the
pair's position picks among them, so a hot expert's tokens spread evenly over its copies. Pairs
are ordered by slot (slot = rank * slots_per_rank + local slot), which is also the order of the
destination ranks, so one all-to-all of counts and one of rows (plus their local slot ids) move
them; the receiver groups the rows by local slot for the experts. `combine` sends the expert
outputs back the same way and sums them per token with the routing weights, in slot order (with
one replica per expert, the same sums as `LocalDispatch`: each token's rows in choice order,
weighted and added in fp32 by one batched GEMM, rounded once).

Over gloo, bfloat16 rows travel as float16 bit patterns (gloo has no bfloat16); NCCL moves them as they are.
A rank with no tokens still takes part: every collective runs with empty splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moecluster.router.experts.dispatch import Dispatched, count_ids, inverse_order, weighted_sum
from moecluster.router.experts.placement import ExpertPlacement


def replica_tables(placement: ExpertPlacement, widest: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts, widest) int64 physical slots of each expert, its replicas cycled to a rectangle
    (default width: the most replicas any expert has), and (experts,) replica counts; on the CPU."""
    replicas = placement.log2phy
    widest = widest or max(len(r) for r in replicas)
    table = torch.tensor([[r[i % len(r)] for i in range(widest)] for r in replicas], dtype=torch.int64)
    return table, torch.tensor([len(r) for r in replicas], dtype=torch.int64)


def pick_slots(flat_ids: torch.Tensor, slot_table: torch.Tensor, num_replicas: torch.Tensor,
               pairs_per_rank: int) -> torch.Tensor:
    """flat_ids (pairs,) logical experts of (token, choice) pairs, each rank's pairs contiguous ->
    (pairs,) the physical slot each pair goes to: replica (position among its rank's pairs) mod the
    expert's replica count, so a hot expert's tokens spread evenly over its copies."""
    position = torch.arange(flat_ids.numel(), device=flat_ids.device) % pairs_per_rank
    return slot_table[flat_ids, position % num_replicas[flat_ids]]


@dataclass(frozen=True)
class _A2AHandle:
    slot_row: torch.Tensor  # (pairs,) for each flat (token * top_k + choice) pair, its row in slot order
    weights: torch.Tensor  # (tokens, top_k) routing weights
    send_counts: list[int]  # rows sent to each rank
    recv_counts: list[int]  # rows received from each rank
    local_order: torch.Tensor  # (received,) received rows sorted by local slot


class AllToAllDispatch:
    def __init__(self, placement: ExpertPlacement, rank: int, group: Any = None, device: torch.device | str = "cpu") -> None:
        self.placement, self.rank, self.group = placement, rank, group
        self.world, self.slots_per_rank = placement.num_ranks, placement.slots_per_rank
        self.slot_table, self.num_replicas = (t.to(device) for t in replica_tables(placement))
        self.gloo = dist.get_backend(group) == "gloo"

    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Dispatched:
        """hidden (tokens, H), expert_ids / weights (tokens, top_k) -> this rank's rows grouped by local slot."""
        top_k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)  # (pairs,)
        slot = pick_slots(flat, self.slot_table, self.num_replicas, flat.numel())  # (pairs,) physical slot of each pair
        order = torch.argsort(slot, stable=True)
        slot = slot[order]
        send_counts = count_ids(slot // self.slots_per_rank, self.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        rows = self._exchange(hidden[order // top_k], recv, send)  # (received, H)
        local = self._exchange((slot % self.slots_per_rank).unsqueeze(1), recv, send).squeeze(1)  # (received,)
        local_order = torch.argsort(local, stable=True)
        per_slot = count_ids(local, self.slots_per_rank)
        handle = _A2AHandle(inverse_order(order), weights, send, recv, local_order)
        return Dispatched(rows[local_order], per_slot, handle)

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """expert_out (received, H) in local-slot order -> (tokens, H) weighted sums."""
        h = dispatched.handle
        assert isinstance(h, _A2AHandle)
        back = torch.empty_like(expert_out)
        back[h.local_order] = expert_out  # undo the grouping by local slot
        returned = self._exchange(back, h.send_counts, h.recv_counts)  # (sent, H) in slot order
        return weighted_sum(returned, h.slot_row, h.weights)  # as LocalDispatch sums

    def _exchange(self, rows: torch.Tensor, recv: list[int], send: list[int]) -> torch.Tensor:
        """One all-to-all of rows (n, D): send[i] rows to rank i, recv[i] rows from rank i."""
        rows = rows.contiguous()
        # gloo has no bfloat16: its bytes travel as float16 (no arithmetic happens on the way)
        wire = rows.view(torch.float16) if self.gloo and rows.dtype == torch.bfloat16 else rows
        out = wire.new_empty((sum(recv), *wire.shape[1:]))
        dist.all_to_all_single(out, wire, output_split_sizes=recv, input_split_sizes=send, group=self.group)
        return out.view(rows.dtype) if wire is not rows else out
