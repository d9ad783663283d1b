"""Where one MoE layer's experts live: logical experts mapped onto physical slots.

A group of `num_ranks` EP ranks holds `slots_per_rank` expert slots each; physical slot `s` lives
on rank `s // slots_per_rank` at local index `s % slots_per_rank`. `phy2log[s]` names the logical
expert in slot `s`. There may be more slots than logical experts: the extra (redundant) slots hold
replicas of hot experts, and dispatch spreads an expert's tokens evenly over its replicas.
`log2phy[e]` lists the slots of expert `e`, ascending.

Invariants, checked on construction: every logical expert has at least one slot, and a rank holds
distinct experts (a second copy on the same rank would take the same rank's time and add nothing).

This is plain data (no torch): the EPLB policy (`eplb.py`) computes placements from load
statistics, the dispatcher reads `log2phy`, and `moves_to` lists the weight copies a rebalance
has to make.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int  # logical experts
    num_ranks: int
    slots_per_rank: int
    phy2log: tuple[int, ...]  # (num_ranks * slots_per_rank,) logical expert of each physical slot
    log2phy: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_ranks", "slots_per_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        phy2log = tuple(self.phy2log)
        if any(isinstance(e, bool) or not isinstance(e, int) for e in phy2log):
            raise ValueError("phy2log must hold integer expert ids")
        object.__setattr__(self, "phy2log", phy2log)
        slots = self.num_ranks * self.slots_per_rank
        if len(phy2log) != slots:
            raise ValueError(f"phy2log has {len(phy2log)} slots, expected num_ranks * slots_per_rank = "
                             f"{self.num_ranks} * {self.slots_per_rank} = {slots}")
        bad = [(s, e) for s, e in enumerate(phy2log) if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"phy2log holds expert ids outside 0..{self.num_experts - 1}: "
                             f"{_some(f'slot {s}: {e}' for s, e in bad)}")
        log2phy: list[list[int]] = [[] for _ in range(self.num_experts)]
        for s, e in enumerate(phy2log):
            log2phy[e].append(s)
        missing = [e for e, where in enumerate(log2phy) if not where]
        if missing:
            raise ValueError(f"logical experts without a slot: {_some(map(str, missing))}")
        for rank in range(self.num_ranks):
            held = phy2log[rank * self.slots_per_rank:(rank + 1) * self.slots_per_rank]
            dup = sorted({e for e in held if held.count(e) > 1})
            if dup:
                raise ValueError(f"rank {rank} holds more than one replica of expert(s) {_some(map(str, dup))}")
        object.__setattr__(self, "log2phy", tuple(tuple(w) for w in log2phy))

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int, redundant_slots: int = 0) -> ExpertPlacement:
        """Experts split evenly and in order over the ranks (rank r holds experts
        floor(r*E/R) .. floor((r+1)*E/R) - 1); the redundant slots, which fill each rank up to
        (E + redundant) / R slots, replicate experts round-robin: each takes the next expert in
        cyclic order that its rank does not hold yet."""
        if num_experts <= 0 or num_ranks <= 0 or redundant_slots < 0:
            raise ValueError(f"need num_experts > 0, num_ranks > 0 and redundant_slots >= 0, got "
                             f"{num_experts}, {num_ranks}, {redundant_slots}")
        total = num_experts + redundant_slots
        if total % num_ranks:
            raise ValueError(f"num_experts + redundant_slots = {num_experts} + {redundant_slots} = {total} is not "
                             f"divisible by num_ranks {num_ranks}: every rank needs the same number of slots")
        per_rank = total // num_ranks
        if per_rank > num_experts:
            raise ValueError(f"{per_rank} slots per rank exceed the {num_experts} experts: a rank would hold "
                             "two replicas of one expert")
        phy2log: list[int] = []
        nxt = 0  # the round-robin pointer over logical experts
        for rank in range(num_ranks):
            held = list(range(rank * num_experts // num_ranks, (rank + 1) * num_experts // num_ranks))
            while len(held) < per_rank:
                while nxt % num_experts in held:
                    nxt += 1
                held.append(nxt % num_experts)
                nxt += 1
            phy2log += held
        return cls(num_experts, num_ranks, per_rank, tuple(phy2log))

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ExpertPlacement:
        keys = {"num_experts", "num_ranks", "slots_per_rank", "phy2log"}
        if set(data) != keys:
            raise ValueError(f"placement needs exactly the keys {sorted(keys)}, got {sorted(data)}")
        phy2log = data["phy2log"]
        if not isinstance(phy2log, Sequence) or isinstance(phy2log, str):
            raise ValueError(f"phy2log must be a list of expert ids, got {type(phy2log).__name__}")
        sizes = (data["num_experts"], data["num_ranks"], data["slots_per_rank"])
        return cls(*sizes, tuple(phy2log))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        return {"num_experts": self.num_experts, "num_ranks": self.num_ranks,
                "slots_per_rank": self.slots_per_rank, "phy2log": list(self.phy2log)}

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self.phy2log)

    def replicas(self, expert: int) -> int:
        """How many slots hold logical expert `expert`."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is outside 0..{self.num_experts - 1}")
        return len(self.log2phy[expert])

    def rank_of(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is outside 0..{self.num_slots - 1}")
        return slot // self.slots_per_rank

    def local_slots(self, rank: int) -> range:
        """The physical slots of `rank`, in local order."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} is outside 0..{self.num_ranks - 1}")
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)

    def local_experts(self, rank: int) -> list[int]:
        """The logical expert of each of `rank`'s slots, in slot order."""
        return [self.phy2log[s] for s in self.local_slots(rank)]

    def moves_to(self, other: ExpertPlacement) -> list[tuple[int, int, int]]:
        """The weight copies that turn this placement into `other`: (slot, new_logical, source) for
        every slot whose expert changes, where `source` is a slot of *this* placement holding
        new_logical, chosen on the slot's own rank when there is one (a local copy), else among
        slots that keep their expert in `other` (so copying in place never reads an overwritten
        slot when such a source exists), else the lowest. Sources name the old placement: an
        applier either reads them all before writing or stages the copies."""
        mine = (self.num_experts, self.num_ranks, self.slots_per_rank)
        theirs = (other.num_experts, other.num_ranks, other.slots_per_rank)
        if mine != theirs:
            raise ValueError(f"placements differ in shape: (experts, ranks, slots_per_rank) {mine} vs {theirs}")
        moves = []
        for slot, (old, new) in enumerate(zip(self.phy2log, other.phy2log)):
            if old == new:
                continue
            rank = slot // self.slots_per_rank
            source = min(self.log2phy[new], key=lambda s: (
                s // self.slots_per_rank != rank, self.phy2log[s] != other.phy2log[s], s))
            moves.append((slot, new, source))
        return moves


def _some(items: Iterable[str], limit: int = 8) -> str:
    """The first `limit` items, comma-separated, with a count of the rest."""
    listed = list(items)
    more = f" (+{len(listed) - limit} more)" if len(listed) > limit else ""
    return ", ".join(listed[:limit]) + more
