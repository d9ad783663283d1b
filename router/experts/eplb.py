"""Expert-parallel load balancing (EPLB): a pure function from load statistics to a placement.

Recording and applying are separate: `ExpertLoadWindow` sums the tokens each expert received over
the last steps, `rebalance` turns those totals into an `ExpertPlacement`, and whoever applies it
copies the weights that `ExpertPlacement.moves_to` lists. Nothing here touches torch.

One layer, `rebalance(load, num_ranks, slots_per_rank)`:
  (a) replicas: every expert gets one slot; each redundant slot then goes to the expert with the
      largest load per replica (an expert has at most one replica per rank);
  (b) packing: the replicas, each carrying load / replicas (dispatch splits an expert's tokens
      evenly over its copies), go onto ranks of exactly `slots_per_rank` slots, never two copies
      of one expert on one rank, minimising the largest rank load: heaviest replica first onto the
      least-loaded rank that has room and lacks that expert, then swaps between the most-loaded
      rank and the others while they lower it; if the largest rank is still more than 0.5% above
      the mean, the replica counts are nudged around that rank's experts and repacked (`_place`);
  (c) `hierarchical` (DeepSeek's policy for a group that spans nodes): whole expert groups (the
      gate's n_group; expert e is in group e // (experts / groups)) are first packed onto nodes,
      balancing node load, so a token's group-limited choices stay on few nodes; then (a) and (b)
      run inside each node over its ranks. It applies when num_nodes > 1 and groups, ranks and
      slots divide evenly over the nodes (`hierarchical_applies`); otherwise `global` runs (a)
      and (b) over all ranks at once.
Given the `previous` placement, the result is steered towards fewer weight copies: nodes and
packed ranks go to the physical node / rank that already holds most of their experts, replicas are
swapped back onto ranks that held them while no rank's load rises above the packing's largest (or
above the mean by `keep_slack`, 1% by default, whichever is higher), and an expert that stays on a
rank keeps its local slot. Re-running on a new window of an unchanged distribution then moves a
few dozen experts instead of nearly all of them (see `moecluster bench eplb`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Literal

from moecluster.router.experts.placement import ExpertPlacement

Policy = Literal["hierarchical", "global"]
_EPS = 1e-12


# ---- load and balance ----------------------------------------------------------------------------
def rank_loads(placement: ExpertPlacement, load: Sequence[float]) -> list[float]:
    """Tokens each rank computes when expert e's load[e] tokens split evenly over its replicas."""
    if len(load) != placement.num_experts:
        raise ValueError(f"load has {len(load)} entries, the placement {placement.num_experts} experts")
    per_slot = [load[e] / len(placement.log2phy[e]) for e in placement.phy2log]
    s = placement.slots_per_rank
    return [math.fsum(per_slot[r * s:(r + 1) * s]) for r in range(placement.num_ranks)]


def balance(placement: ExpertPlacement, load: Sequence[float]) -> float:
    """max rank load / mean rank load (1.0 is perfect; 1.0 for an all-zero load)."""
    loads = rank_loads(placement, load)
    mean = math.fsum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


# ---- (a) replica counts --------------------------------------------------------------------------
def replica_counts(load: Sequence[float], num_slots: int, max_replicas: int) -> list[int]:
    """One slot per expert, then each extra slot to the expert with the most load per replica
    (ties: lowest id) among those below `max_replicas`."""
    n = len(load)
    if not n <= num_slots <= n * max_replicas:
        raise ValueError(f"{num_slots} slots cannot hold {n} experts with 1..{max_replicas} replicas each")
    counts = [1] * n
    heap = [(-float(w), e) for e, w in enumerate(load)] if max_replicas > 1 else []
    heapq.heapify(heap)
    for _ in range(num_slots - n):  # the heap holds exactly the experts below the cap
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < max_replicas:
            heapq.heappush(heap, (-load[e] / counts[e], e))
    return counts


# ---- (b) packing ---------------------------------------------------------------------------------
def pack(weights: Sequence[float], kinds: Sequence[int], num_bins: int, bin_size: int,
         max_swap_rounds: int | None = None) -> list[list[int]]:
    """Item indices per bin: every bin gets exactly `bin_size` items, no two of one kind, and the
    largest bin weight is kept small (greedy, heaviest first, then improving swaps)."""
    if len(weights) != num_bins * bin_size or len(kinds) != len(weights):
        raise ValueError(f"{len(weights)} items for {num_bins} bins of {bin_size}")
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    held: list[set[int]] = [set() for _ in range(num_bins)]
    total = [0.0] * num_bins

    def put(b: int, i: int) -> None:
        bins[b].append(i)
        held[b].add(kinds[i])
        total[b] += weights[i]

    def take(b: int, i: int) -> None:
        bins[b].remove(i)
        held[b].discard(kinds[i])
        total[b] -= weights[i]

    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], kinds[i], i)):
        k, w = kinds[i], weights[i]
        open_bins = [b for b in range(num_bins) if len(bins[b]) < bin_size and k not in held[b]]
        if open_bins:
            put(min(open_bins, key=lambda b: (total[b], len(bins[b]), b)), i)
            continue
        # Every bin with room already holds kind k; a full bin without k exists (k has at most
        # num_bins items). Move one of its items, of a kind the roomy bin lacks, into the roomy bin.
        best = None
        for f in (b for b in range(num_bins) if len(bins[b]) < bin_size):
            for g in (b for b in range(num_bins) if k not in held[b]):
                for x in bins[g]:
                    if kinds[x] not in held[f]:
                        cost = (max(total[f] + weights[x], total[g] - weights[x] + w), f, g, x)
                        best = cost if best is None or cost < best else best
        if best is None:  # cannot happen when every kind has at most num_bins items
            raise ValueError(f"cannot place item {i} of kind {k}: too many items of one kind")
        _, f, g, x = best
        take(g, x)
        put(f, x)
        put(g, i)

    rounds = max_swap_rounds if max_swap_rounds is not None else 4 * len(weights)
    for _ in range(rounds):
        a = max(range(num_bins), key=lambda b: (total[b], -b))
        best = None
        for b in range(num_bins):
            if b == a:
                continue
            for x in bins[a]:
                if kinds[x] in held[b]:
                    continue
                for y in bins[b]:
                    d = weights[x] - weights[y]
                    if d <= 0 or kinds[y] in held[a]:
                        continue
                    new = max(total[a] - d, total[b] + d)
                    if new < total[a] - _EPS * max(1.0, total[a]) and (best is None or new < best[0]):
                        best = (new, b, x, y)
        if best is None:
            break
        _, b, x, y = best
        take(a, x)
        take(b, y)
        put(a, y)
        put(b, x)
    return bins


def _place(load: Sequence[float], num_ranks: int, slots_per_rank: int, tolerance: float = 0.005,
           max_rounds: int = 8) -> list[list[int]]:
    """(a) + (b) for one set of ranks: the (local) expert ids on each packed rank.

    Replica counts chosen by load alone can force a bad packing: with 8 ranks, a hot expert with
    3 replicas and another with 6 must share a rank. While the largest rank is more than
    `tolerance` above the mean, counts are nudged around the experts of that rank (one replica
    fewer for one of them, given to whichever expert then carries most per replica; or one more,
    taken from whichever expert loses least) and repacked; the best packing is kept."""
    cap = num_ranks
    counts = replica_counts(load, num_ranks * slots_per_rank, cap)
    best = _pack_counts(load, counts, num_ranks, slots_per_rank)
    mean = math.fsum(load) / num_ranks
    for _ in range(max_rounds):
        if best[0] <= mean * (1 + tolerance):
            break
        tried = [_pack_counts(load, c, num_ranks, slots_per_rank) for c in _nudges(load, best[2], best[1], cap)]
        better = min(tried, default=best, key=lambda t: t[0])
        if better[0] >= best[0] * (1 - _EPS) - _EPS:
            break
        best = better
    return best[1]


def _pack_counts(load: Sequence[float], counts: list[int], num_ranks: int,
                 slots_per_rank: int) -> tuple[float, list[list[int]], list[int]]:
    """(largest rank load, experts per rank, counts) of packing these replica counts."""
    kinds = [e for e, c in enumerate(counts) for _ in range(c)]
    weights = [load[e] / counts[e] for e in kinds]
    bins = [[kinds[i] for i in b] for b in pack(weights, kinds, num_ranks, slots_per_rank)]
    return max(math.fsum(load[e] / counts[e] for e in b) for b in bins), bins, counts


def _nudges(load: Sequence[float], counts: list[int], bins: list[list[int]], cap: int) -> list[list[int]]:
    """Replica counts one step away from `counts`, moving a replica to or from an expert of the
    most loaded rank."""
    top = max(bins, key=lambda b: math.fsum(load[e] / counts[e] for e in b))
    out = []
    for e in sorted(top, key=lambda e: -load[e] / counts[e]):
        if counts[e] > 1:
            gets = [f for f in range(len(load)) if f != e and counts[f] < cap]
            if gets:
                f = max(gets, key=lambda f: (load[f] / counts[f], -f))
                out.append([c - (g == e) + (g == f) for g, c in enumerate(counts)])
        if counts[e] < cap:
            gives = [f for f in range(len(load)) if f != e and counts[f] > 1]
            if gives:
                f = min(gives, key=lambda f: (load[f] / (counts[f] - 1), f))
                out.append([c + (g == e) - (g == f) for g, c in enumerate(counts)])
    return out


# ---- (c) policies ----------------------------------------------------------------------------------
def hierarchical_applies(num_experts: int, num_ranks: int, slots_per_rank: int, num_nodes: int,
                         num_groups: int) -> bool:
    """Whether `hierarchical` packs groups onto nodes, rather than falling back to `global`."""
    return (num_nodes > 1 and num_ranks % num_nodes == 0 and num_groups > 0 and num_experts % num_groups == 0
            and num_groups % num_nodes == 0 and slots_per_rank <= num_experts // num_nodes)


def rebalance(load: Sequence[float], num_ranks: int, slots_per_rank: int, num_nodes: int = 1,
              num_groups: int = 1, policy: Policy = "hierarchical",
              previous: ExpertPlacement | None = None, keep_slack: float = 0.01) -> ExpertPlacement:
    """A placement of one layer whose expert e received load[e] tokens over the recording window.
    `previous`: the placement in force, to move few experts away from; `keep_slack`: how far above
    the mean rank load (a fraction) a rank may go to keep an expert where it is."""
    num_experts = len(load)
    _check(load, num_ranks, slots_per_rank, num_nodes, num_groups, policy)
    if not (math.isfinite(keep_slack) and keep_slack >= 0):
        raise ValueError(f"keep_slack must be a finite fraction >= 0, got {keep_slack}")
    if previous is not None and (previous.num_experts, previous.num_ranks, previous.slots_per_rank) != (
            num_experts, num_ranks, slots_per_rank):
        raise ValueError(f"previous placement has (experts, ranks, slots_per_rank) = "
                         f"{previous.num_experts, previous.num_ranks, previous.slots_per_rank}, expected "
                         f"{num_experts, num_ranks, slots_per_rank}")
    load = [float(w) for w in load]
    if policy == "hierarchical" and hierarchical_applies(num_experts, num_ranks, slots_per_rank, num_nodes,
                                                         num_groups):
        size = num_experts // num_groups
        group_load = [math.fsum(load[g * size:(g + 1) * size]) for g in range(num_groups)]
        groups = pack(group_load, list(range(num_groups)), num_nodes, num_groups // num_nodes)
        node_experts = [sorted(e for g in gs for e in range(g * size, (g + 1) * size)) for gs in groups]
        per_node = num_ranks // num_nodes
        if previous is not None:  # each node gets the groups its ranks mostly hold already
            held = [{e for r in range(n * per_node, (n + 1) * per_node) for e in previous.local_experts(r)}
                    for n in range(num_nodes)]
            node_experts = _match(node_experts, held)
        nodes = []  # per node, per rank: logical experts
        for experts in node_experts:
            packed = _place([load[e] for e in experts], per_node, slots_per_rank)
            nodes.append([[experts[i] for i in r] for r in packed])
    else:
        nodes = [_place(load, num_ranks, slots_per_rank)]
    if previous is None:
        ranks = [sorted(r) for node in nodes for r in node]
    else:
        count: dict[int, int] = {}
        for e in (e for node in nodes for r in node for e in r):
            count[e] = count.get(e, 0) + 1
        weight = [load[e] / count[e] for e in range(num_experts)]  # tokens per replica
        totals = [math.fsum(weight[e] for e in r) for node in nodes for r in node]
        limit = max(max(totals), (1 + keep_slack) * math.fsum(totals) / num_ranks) * (1 + _EPS)
        per_node, ranks = num_ranks // len(nodes), []
        for n, node in enumerate(nodes):
            ranks += _arrange(node, weight, previous, range(n * per_node, (n + 1) * per_node), limit)
    return ExpertPlacement(num_experts, num_ranks, slots_per_rank, tuple(e for r in ranks for e in r))


def rebalance_model(loads: Sequence[Sequence[float]], num_ranks: int, slots_per_rank: int, num_nodes: int = 1,
                    num_groups: int = 1, policy: Policy = "hierarchical",
                    previous: Sequence[ExpertPlacement] | None = None,
                    keep_slack: float = 0.01) -> list[ExpertPlacement]:
    """`rebalance` for every layer (loads[layer][expert]; previous, if given, one per layer)."""
    if previous is not None and len(previous) != len(loads):
        raise ValueError(f"{len(previous)} previous placements for {len(loads)} layers")
    return [rebalance(load, num_ranks, slots_per_rank, num_nodes, num_groups, policy,
                      previous[i] if previous is not None else None, keep_slack) for i, load in enumerate(loads)]


def _check(load: Sequence[float], num_ranks: int, slots_per_rank: int, num_nodes: int, num_groups: int,
           policy: str) -> None:
    if policy not in ("hierarchical", "global"):
        raise ValueError(f"policy must be 'hierarchical' or 'global', got {policy!r}")
    for name, value in (("num_ranks", num_ranks), ("slots_per_rank", slots_per_rank), ("num_nodes", num_nodes),
                        ("num_groups", num_groups)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if not load:
        raise ValueError("load is empty: need one entry per logical expert")
    bad = [e for e, w in enumerate(load) if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"load must be finite and non-negative; expert {bad[0]} has {load[bad[0]]}")
    if num_ranks * slots_per_rank < len(load):
        raise ValueError(f"{num_ranks} ranks x {slots_per_rank} slots = {num_ranks * slots_per_rank} slots "
                         f"cannot hold {len(load)} experts")
    if slots_per_rank > len(load):
        raise ValueError(f"{slots_per_rank} slots per rank exceed the {len(load)} experts: a rank would hold "
                         "two replicas of one expert")


def _match(packed: list[list[int]], held: list[set[int]]) -> list[list[int]]:
    """Reorder `packed` so that packed set i goes to position j with the largest overlap with
    held[j] (greedy over pairs, largest overlap first; ties by index)."""
    pairs = sorted(((len(held[j].intersection(p)), i, j) for i, p in enumerate(packed) for j in range(len(held))),
                   key=lambda t: (-t[0], t[1], t[2]))
    out: list[list[int] | None] = [None] * len(held)
    used = set()
    for _, i, j in pairs:
        if i not in used and out[j] is None:
            out[j], used = packed[i], used | {i}
    return out  # type: ignore[return-value]


def _arrange(packed: list[list[int]], weight: Sequence[float], previous: ExpertPlacement, ranks: range,
             limit: float) -> list[list[int]]:
    """Packed ranks onto physical `ranks`, in slot order: each goes to the physical rank that held
    most of its experts, `_keep` swaps put more experts back where they were, and an expert that
    stays on its rank keeps its old local slot."""
    before = [previous.local_experts(r) for r in ranks]
    held = [set(b) for b in before]
    packed = _keep(_match(packed, held), held, weight, limit)
    out = []
    for new, old in zip(packed, before):
        stay = set(new).intersection(old)
        rest = iter(sorted(set(new) - stay))
        out.append([e if e in stay else next(rest) for e in old])
    return out


def _keep(packed: list[list[int]], before: list[set[int]], weight: Sequence[float], limit: float) -> list[list[int]]:
    """Fewer weight copies within a load limit: swap two replicas between ranks when that puts at
    least one of them back on a rank that held it before and neither rank goes above `limit`.
    Every swap adds at least one expert that stays, so this ends."""
    bins = [list(r) for r in packed]
    have = [set(r) for r in bins]
    total = [math.fsum(weight[e] for e in r) for r in bins]
    where: dict[int, list[int]] = {}  # expert -> ranks that held it before
    for b, old in enumerate(before):
        for e in old:
            where.setdefault(e, []).append(b)
    improved = True
    while improved:
        improved = False
        for a in range(len(bins)):
            for x in [e for e in bins[a] if e not in before[a]]:  # x would be copied onto a
                best = None
                for b in where.get(x, ()):
                    if x in have[b]:
                        continue
                    for y in bins[b]:
                        if y in before[b] or y in have[a]:
                            continue
                        d = weight[x] - weight[y]
                        if total[a] - d > limit or total[b] + d > limit:
                            continue
                        key = (y not in before[a], abs(d), b, y)  # both back home first, then the closest weights
                        best = key if best is None or key < best else best
                if best is not None:
                    _, _, b, y = best
                    for r, out, inn in ((a, x, y), (b, y, x)):
                        bins[r][bins[r].index(out)] = inn
                        have[r].discard(out)
                        have[r].add(inn)
                        total[r] += weight[inn] - weight[out]
                    improved = True
    return bins


# ---- recording -----------------------------------------------------------------------------------
class ExpertLoadWindow:
    """Tokens per expert over each layer's last `window_steps` recorded steps (a ring buffer).

    Call `record(layer, counts)` once per layer per step, counts[e] = tokens routed to expert e
    in that step (all top-k choices, before replica selection)."""

    def __init__(self, num_layers: int, num_experts: int, window_steps: int) -> None:
        for name, value in (("num_layers", num_layers), ("num_experts", num_experts), ("window_steps", window_steps)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.num_layers, self.num_experts, self.window_steps = num_layers, num_experts, window_steps
        self._ring = [[[0] * num_experts for _ in range(window_steps)] for _ in range(num_layers)]
        self._sum = [[0] * num_experts for _ in range(num_layers)]
        self._steps = [0] * num_layers  # steps recorded per layer, ever

    def record(self, layer: int, counts: Sequence[int]) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside 0..{self.num_layers - 1}")
        if len(counts) != self.num_experts:
            raise ValueError(f"counts has {len(counts)} entries, expected {self.num_experts} experts")
        new = [int(c) for c in counts]
        if min(new) < 0:
            raise ValueError("counts must be non-negative")
        slot = self._steps[layer] % self.window_steps
        old, total = self._ring[layer][slot], self._sum[layer]
        for e in range(self.num_experts):
            total[e] += new[e] - old[e]
        self._ring[layer][slot] = new
        self._steps[layer] += 1

    def steps(self, layer: int = 0) -> int:
        """Steps in the window for `layer` (at most window_steps)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside 0..{self.num_layers - 1}")
        return min(self._steps[layer], self.window_steps)

    def totals(self) -> list[list[float]]:
        """(layers, experts) tokens over the window."""
        return [[float(c) for c in layer] for layer in self._sum]

    def reset(self) -> None:
        """Forget everything recorded (after a rebalance, say, when the next window starts fresh)."""
        for layer in range(self.num_layers):
            self._ring[layer] = [[0] * self.num_experts for _ in range(self.window_steps)]
            self._sum[layer] = [0] * self.num_experts
            self._steps[layer] = 0
