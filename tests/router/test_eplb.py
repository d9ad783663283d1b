"""EPLB: replica counts, packing, both policies' invariants, balance, and the load window."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from moecluster.cluster.bench.eplb import sample_counts, zipf_probs
from moecluster.router.experts.eplb import (
    ExpertLoadWindow,
    _place,
    balance,
    hierarchical_applies,
    pack,
    rank_loads,
    rebalance,
    rebalance_model,
    replica_counts,
)
from moecluster.router.experts.placement import ExpertPlacement


def _random_load(seed: int, n: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.paretovariate(1.2) for _ in range(n)]


def _check(p: ExpertPlacement, experts: int, ranks: int, slots: int) -> None:
    assert (p.num_experts, p.num_ranks, p.slots_per_rank, len(p.phy2log)) == (experts, ranks, slots, ranks * slots)
    assert all(p.replicas(e) >= 1 for e in range(experts))
    assert sum(p.replicas(e) for e in range(experts)) == ranks * slots
    for r in range(ranks):
        assert len(set(p.local_experts(r))) == slots  # distinct experts on a rank


# ---- pieces ------------------------------------------------------------------------------------------
def test_replica_counts_go_to_the_largest_load_per_replica() -> None:
    assert replica_counts([10, 1, 1, 1], 6, max_replicas=4) == [3, 1, 1, 1]
    assert replica_counts([10, 1, 1, 1], 6, max_replicas=2) == [2, 2, 1, 1]  # capped; ties to the lowest id
    assert replica_counts([0, 0, 0], 5, max_replicas=2) == [2, 2, 1]
    with pytest.raises(ValueError, match="cannot hold"):
        replica_counts([1, 1], 5, max_replicas=2)


def test_pack_fills_bins_exactly_and_repairs_a_dead_end() -> None:
    # greedy leaves the second replica of kind 4 with only the bin that already has kind 4
    weights, kinds = [10, 3, 3, 1, 0.5, 0.5], [0, 1, 2, 3, 4, 4]
    bins = pack(weights, kinds, 2, 3)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(len(b) == 3 and len({kinds[i] for i in b}) == 3 for b in bins)
    assert sorted(sum(weights[i] for i in b) for b in bins) == [6.5, 11.5]


@pytest.mark.parametrize("seed", range(6))
def test_pack_invariants_on_random_items(seed: int) -> None:
    rng = random.Random(seed)
    num_bins, size = rng.randint(2, 6), rng.randint(2, 5)
    kinds = sorted(rng.randrange(num_bins * size) for _ in range(num_bins * size))
    while any(kinds.count(k) > num_bins for k in kinds):  # at most one item of a kind per bin
        kinds = sorted(rng.randrange(num_bins * size) for _ in range(num_bins * size))
    weights = [rng.random() for _ in kinds]
    bins = pack(weights, kinds, num_bins, size)
    assert sorted(i for b in bins for i in b) == list(range(len(kinds)))
    assert all(len(b) == size and len({kinds[i] for i in b}) == size for b in bins)


def test_replica_counts_are_nudged_when_hot_experts_must_share_a_rank() -> None:
    """Two hot experts on 8 ranks: the load-only counts (6 and 3 replicas) force two ranks to
    hold both; moving a replica elsewhere and repacking lowers the largest rank a lot."""
    load = [2.964, 1.707, 0.586, 0.462, 0.238, 0.18, 0.156, 0.133] + [0.028] * 56

    def largest(bins: list[list[int]]) -> float:
        count = [sum(e in b for b in bins) for e in range(len(load))]
        return max(sum(load[e] / count[e] for e in b) for b in bins) / (sum(load) / 8)

    assert replica_counts(load, 72, 8)[:3] == [6, 3, 2]
    plain, nudged = _place(load, 8, 9, max_rounds=0), _place(load, 8, 9)
    assert largest(nudged) < 0.92 * largest(plain)
    assert balance(rebalance(load, 8, 9, policy="global"), load) == pytest.approx(largest(nudged))


def test_rank_loads_split_an_expert_over_its_replicas() -> None:
    p = ExpertPlacement(3, 2, 2, (0, 1, 0, 2))
    assert rank_loads(p, [10, 4, 6]) == [9.0, 11.0]
    assert balance(p, [10, 4, 6]) == pytest.approx(11 / 10)
    assert balance(p, [0, 0, 0]) == 1.0
    with pytest.raises(ValueError, match="2 entries"):
        balance(p, [1, 2])


# ---- rebalance ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["global", "hierarchical"])
@pytest.mark.parametrize(("experts", "ranks", "slots", "nodes", "groups"), [
    (16, 4, 5, 2, 4), (64, 8, 10, 4, 8), (32, 8, 4, 2, 4), (12, 3, 5, 1, 1), (20, 6, 6, 3, 2),
])
def test_rebalance_invariants(policy: str, experts: int, ranks: int, slots: int, nodes: int, groups: int) -> None:
    for seed in range(3):
        load = _random_load(seed, experts)
        p = rebalance(load, ranks, slots, nodes, groups, policy)  # type: ignore[arg-type]
        _check(p, experts, ranks, slots)
        assert p == rebalance(load, ranks, slots, nodes, groups, policy)  # type: ignore[arg-type]
        again = rebalance(load, ranks, slots, nodes, groups, policy, previous=p)  # type: ignore[arg-type]
        _check(again, experts, ranks, slots)
        assert again == p  # nothing changed, nothing moves


def test_uniform_load_is_perfectly_balanced() -> None:
    uniform = [100.0] * 256
    assert balance(ExpertPlacement.contiguous(256, 32), uniform) == 1.0
    assert balance(rebalance(uniform, 32, 8, policy="global"), uniform) == pytest.approx(1.0)
    assert balance(rebalance(uniform, 32, 9, 4, 8), uniform) == pytest.approx(1.0)


def test_hot_experts_get_replicas_on_different_ranks() -> None:
    load = [1000.0, 500.0] + [10.0] * 30
    p = rebalance(load, 8, 5, policy="global")
    assert p.replicas(0) > p.replicas(1) > 1 and all(p.replicas(e) == 1 for e in range(2, 32))
    assert len({p.rank_of(s) for s in p.log2phy[0]}) == p.replicas(0)


def test_zipf_load_is_balanced_at_deepseek_scale() -> None:
    """256 experts on 32 ranks with 32 redundant slots: contiguous is several times the mean,
    the rebalanced placement within 10%, on the recorded trace and on a fresh one."""
    rng = np.random.default_rng(7)
    probs = zipf_probs(256, 1.2, rng)
    recorded, fresh = ([float(c) for c in sample_counts(probs, 16384, 8, rng)] for _ in range(2))
    before = balance(ExpertPlacement.contiguous(256, 32, 32), recorded)
    after = rebalance(recorded, 32, 9, policy="global")
    assert before > 2.5
    assert balance(after, recorded) <= 1.10 and balance(after, fresh) <= 1.10
    moved = rebalance(recorded, 32, 9, policy="global", previous=ExpertPlacement.contiguous(256, 32, 32))
    assert balance(moved, recorded) <= 1.02 and balance(moved, fresh) <= 1.10


def test_hierarchical_keeps_each_group_inside_one_node() -> None:
    experts, groups, nodes, ranks, slots = 64, 8, 4, 8, 10
    per_group, per_node = experts // groups, ranks // nodes
    for seed in range(4):
        load = _random_load(seed, experts)
        p = rebalance(load, ranks, slots, nodes, groups, "hierarchical")
        node_of_group = []
        for g in range(groups):
            found = {p.rank_of(s) // per_node for e in range(g * per_group, (g + 1) * per_group) for s in p.log2phy[e]}
            assert len(found) == 1, (seed, g, found)
            node_of_group += found
        assert sorted(node_of_group) == [n for n in range(nodes) for _ in range(groups // nodes)]
        # the groups are split over nodes as evenly as any split can be (brute force)
        group_load = [sum(load[g * per_group:(g + 1) * per_group]) for g in range(groups)]
        node_load = [sum(group_load[g] for g in range(groups) if node_of_group[g] == n) for n in range(nodes)]
        best = min(max(group_load[a] + group_load[b] for a, b in zip(order[::2], order[1::2]))
                   for order in itertools.permutations(range(groups)))
        assert max(node_load) == pytest.approx(best)


def test_hierarchical_falls_back_to_global() -> None:
    load = _random_load(3, 64)
    assert hierarchical_applies(64, 8, 10, 4, 8)
    for nodes, groups in ((1, 8), (4, 1), (4, 6), (3, 8)):
        assert not hierarchical_applies(64, 8, 10, nodes, groups)
        assert rebalance(load, 8, 10, nodes, groups, "hierarchical") == rebalance(load, 8, 10, policy="global")


def test_previous_placement_means_fewer_moves() -> None:
    rng = np.random.default_rng(1)
    probs = zipf_probs(256, 1.2, rng)
    a, b = ([float(c) for c in sample_counts(probs, 8192, 8, rng)] for _ in range(2))
    first = rebalance(a, 32, 9, policy="global")
    blind = rebalance(b, 32, 9, policy="global")
    steered = rebalance(b, 32, 9, policy="global", previous=first)
    assert len(first.moves_to(steered)) < len(first.moves_to(blind)) / 2
    assert balance(steered, b) <= max(balance(blind, b), 1.01) + 1e-9
    strict = rebalance(b, 32, 9, policy="global", previous=first, keep_slack=0.0)
    assert balance(strict, b) == pytest.approx(balance(blind, b))  # no slack: no cost in balance


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"policy": "random"}, "policy must be"),
    ({"load": [1.0, -1.0, 2.0, 3.0]}, "expert 1 has -1.0"),
    ({"load": [1.0, float("nan"), 2.0, 3.0]}, "finite"),
    ({"load": []}, "load is empty"),
    ({"num_ranks": 1}, "cannot hold 4 experts"),
    ({"slots_per_rank": 5, "num_ranks": 1}, "exceed the 4 experts"),
    ({"num_nodes": 0}, "num_nodes must be positive"),
    ({"keep_slack": -0.1}, "keep_slack"),
    ({"previous": ExpertPlacement.contiguous(4, 4)}, "previous placement has"),
])
def test_rebalance_rejects_bad_input(kwargs: dict, message: str) -> None:
    args = {"load": [1.0, 2.0, 3.0, 4.0], "num_ranks": 2, "slots_per_rank": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        rebalance(**args)


def test_rebalance_model_is_rebalance_per_layer() -> None:
    loads = [_random_load(s, 32) for s in range(3)]
    placements = rebalance_model(loads, 8, 5, 2, 4)
    assert placements == [rebalance(load, 8, 5, 2, 4) for load in loads]
    assert rebalance_model(loads, 8, 5, 2, 4, previous=placements) == placements
    with pytest.raises(ValueError, match="2 previous placements for 3 layers"):
        rebalance_model(loads, 8, 5, previous=placements[:2])


# ---- recording ---------------------------------------------------------------------------------------
def test_window_sums_the_last_steps_per_layer() -> None:
    w = ExpertLoadWindow(num_layers=2, num_experts=3, window_steps=3)
    steps = [[1, 0, 2], [0, 5, 0], [3, 3, 3], [7, 0, 1], [0, 0, 4]]
    for i, counts in enumerate(steps):
        w.record(0, counts)
        if i < 2:
            w.record(1, [10, 20, 30])
    assert w.totals() == [[10.0, 3.0, 8.0], [20.0, 40.0, 60.0]]  # layer 0: steps 2..4
    assert w.steps(0) == 3 and w.steps(1) == 2
    w.reset()
    assert w.totals() == [[0.0] * 3] * 2 and w.steps(0) == 0


def test_window_rejects_bad_records() -> None:
    w = ExpertLoadWindow(1, 3, 2)
    for args, message in (((1, [1, 2, 3]), "layer 1"), ((0, [1, 2]), "3 experts"), ((0, [1, -2, 3]), "non-negative")):
        with pytest.raises(ValueError, match=message):
            w.record(*args)
    with pytest.raises(ValueError, match="window_steps must be positive"):
        ExpertLoadWindow(1, 3, 0)
