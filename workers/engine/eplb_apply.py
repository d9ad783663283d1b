"""Applying a new expert placement online, at a step boundary, on every rank of an EP group.

Recording is the MoE layers' own token counters (`MoE.expert_counts`); the placement algorithm is
the pure `router.experts.eplb.rebalance`; this module only gathers the counts, asks for a
placement and moves the weights. It is collective: every rank calls `rebalance_group` at the same
step boundary. All ranks see the same summed counts and compute the same placements, so they agree
without further messages on which slot's weights come from where: a new slot takes its expert
from a slot of the old placement on its own rank when there is one (a local copy), else from the
lowest such slot elsewhere (a point-to-point transfer). The dispatcher and the expert stack are
swapped only after every transfer completed, so no step ever sees half-moved weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moecluster.router.experts.all_to_all import AllToAllDispatch
from moecluster.router.experts.dispatch import LocalDispatch
from moecluster.router.experts.eplb import balance, rebalance
from moecluster.router.experts.placement import ExpertPlacement
from moecluster.workers.model.deepseek import DeepseekV3Model
from moecluster.workers.model.moe import MoE


@dataclass(frozen=True)
class RebalanceReport:
    layers: int
    moved_slots: int  # slots whose expert changed, over all layers and ranks
    balance_before: float  # mean over layers of max/mean rank load on the recorded window
    balance_after: float


def rebalance_group(model: DeepseekV3Model, rank: int, group: Any = None, policy: str = "global") -> RebalanceReport:
    moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    if not moes:
        return RebalanceReport(0, 0, 1.0, 1.0)
    counts = torch.stack([m.expert_counts.to(torch.float64) for m in moes])  # (layers, experts)
    dist.all_reduce(counts, group=group)
    moved, before, after = 0, [], []
    for moe, load in zip(moes, counts.tolist()):
        if isinstance(moe.dispatcher, LocalDispatch):  # one rank holding every expert once: nothing to move
            moe.expert_counts.zero_()
            continue
        old = _placement(moe)
        if sum(load) == 0:
            continue
        new = rebalance(load, old.num_ranks, old.slots_per_rank, policy=policy, previous=old)  # type: ignore[arg-type]
        before.append(balance(old, load))
        after.append(balance(new, load))
        moved += sum(a != b for a, b in zip(old.phy2log, new.phy2log))
        _move_weights(moe, old, new, rank, group)
        moe.expert_counts.zero_()
    n = max(1, len(before))
    return RebalanceReport(len(moes), moved, sum(before) / n or 1.0, sum(after) / n or 1.0)


def _placement(moe: MoE) -> ExpertPlacement:
    dispatcher = moe.dispatcher
    if not isinstance(dispatcher, AllToAllDispatch):
        raise ValueError("rebalancing needs an expert-parallel MoE layer (AllToAllDispatch)")
    return dispatcher.placement


def _source(old: ExpertPlacement, expert: int, rank: int) -> int:
    """The old slot a new slot on `rank` takes `expert` from: its own rank's copy if any."""
    slots = old.log2phy[expert]
    return next((s for s in slots if old.rank_of(s) == rank), slots[0])


def _move_weights(moe: MoE, old: ExpertPlacement, new: ExpertPlacement, rank: int, group: Any) -> None:
    spr = old.slots_per_rank
    stacks = moe.experts.slot_tensors()  # each (local slots, ...)
    fresh = [torch.empty_like(t) for t in stacks]
    ops: list[dist.P2POp] = []
    for slot, expert in enumerate(new.phy2log):
        dst_rank, src = new.rank_of(slot), _source(old, expert, new.rank_of(slot))
        src_rank = old.rank_of(src)
        if dst_rank == rank and src_rank == rank:
            for t, f in zip(stacks, fresh):
                f[slot % spr].copy_(t[src % spr])
        elif dst_rank == rank:
            ops += [dist.P2POp(dist.irecv, _wire(f[slot % spr]), src_rank, group) for f in fresh]
        elif src_rank == rank:
            ops += [dist.P2POp(dist.isend, _wire(t[src % spr].contiguous()), dst_rank, group) for t in stacks]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    moe.experts.load_slots(fresh, new.local_experts(rank))
    moe.dispatcher = AllToAllDispatch(new, rank, group, stacks[0].device)


def _wire(t: torch.Tensor) -> torch.Tensor:
    """A same-bytes view gloo can carry (it has no bfloat16 or float8)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.float16)
    if t.element_size() == 1 and t.is_floating_point():
        return t.view(torch.uint8)
    return t
