"""ExpertPlacement: validation, the contiguous layout, queries, JSON round trips and moves."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from moecluster.router.experts.eplb import rebalance
from moecluster.router.experts.placement import ExpertPlacement


def test_contiguous_without_redundancy_is_in_order() -> None:
    p = ExpertPlacement.contiguous(8, 4)
    assert (p.num_experts, p.num_ranks, p.slots_per_rank, p.num_slots) == (8, 4, 2, 8)
    assert p.phy2log == tuple(range(8))
    assert p.log2phy == tuple((e,) for e in range(8))
    assert p.local_experts(1) == [2, 3] and p.local_slots(3) == range(6, 8)
    assert all(p.replicas(e) == 1 for e in range(8))


def test_contiguous_redundant_slots_replicate_round_robin_off_the_rank() -> None:
    p = ExpertPlacement.contiguous(16, 4, redundant_slots=4)
    # four experts per rank, then the next expert in cyclic order that the rank does not hold
    assert [p.local_experts(r) for r in range(4)] == [
        [0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12], [12, 13, 14, 15, 0]]
    assert p.log2phy[0] == (0, 19) and p.log2phy[4] == (4, 5) and p.replicas(1) == 1


def test_contiguous_at_deepseek_scale() -> None:
    p = ExpertPlacement.contiguous(256, 32, redundant_slots=32)
    assert p.slots_per_rank == 9 and p.num_slots == 288
    assert sorted(p.replicas(e) for e in range(256)) == [1] * 224 + [2] * 32
    assert p.local_experts(0)[:8] == list(range(8))


def test_contiguous_with_uneven_experts_spreads_them() -> None:
    p = ExpertPlacement.contiguous(6, 4, redundant_slots=2)  # 8 slots, 2 per rank
    assert sorted(len(set(p.local_experts(r))) for r in range(4)) == [2, 2, 2, 2]
    assert all(p.replicas(e) >= 1 for e in range(6))


@pytest.mark.parametrize(("experts", "ranks", "redundant", "message"), [
    (10, 4, 0, "not divisible by num_ranks 4"),
    (2, 1, 2, "exceed the 2 experts"),
    (0, 4, 0, "num_experts > 0"),
    (8, 4, -1, "redundant_slots >= 0"),
])
def test_contiguous_rejects_impossible_layouts(experts: int, ranks: int, redundant: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExpertPlacement.contiguous(experts, ranks, redundant)


@pytest.mark.parametrize(("args", "message"), [
    ((4, 2, 2, (0, 1, 2)), "phy2log has 3 slots, expected"),
    ((4, 2, 2, (0, 1, 2, 4)), r"outside 0..3: slot 3: 4"),
    ((4, 2, 2, (0, 1, 2, -1)), "outside 0..3"),
    ((4, 2, 2, (0, 1, 2, 2)), "without a slot: 3"),
    ((3, 2, 2, (0, 0, 1, 2)), "rank 0 holds more than one replica of expert"),
    ((4, 0, 2, ()), "num_ranks must be a positive integer"),
    ((4, 2, 2, (0, 1, 2, 3.0)), "integer expert ids"),
])
def test_validation_names_the_problem(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExpertPlacement(*args)


def test_placement_is_frozen_hashable_and_takes_lists() -> None:
    p = ExpertPlacement(4, 2, 3, [0, 1, 2, 3, 0, 1])  # type: ignore[arg-type]
    assert p.phy2log == (0, 1, 2, 3, 0, 1) and p.log2phy == ((0, 4), (1, 5), (2,), (3,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.num_ranks = 3  # type: ignore[misc]
    assert hash(p) == hash(ExpertPlacement(4, 2, 3, (0, 1, 2, 3, 0, 1)))


def test_queries_check_their_range() -> None:
    p = ExpertPlacement.contiguous(8, 4)
    assert [p.rank_of(s) for s in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    for call, message in ((lambda: p.rank_of(8), "slot 8"), (lambda: p.local_slots(4), "rank 4"),
                          (lambda: p.replicas(-1), "expert -1"), (lambda: p.local_experts(-1), "rank -1")):
        with pytest.raises(ValueError, match=message):
            call()


def test_json_round_trip() -> None:
    p = ExpertPlacement.contiguous(16, 4, redundant_slots=4)
    back = ExpertPlacement.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p and back.log2phy == p.log2phy
    assert p.to_dict() == {"num_experts": 16, "num_ranks": 4, "slots_per_rank": 5, "phy2log": list(p.phy2log)}


def test_from_dict_rejects_bad_input() -> None:
    good = ExpertPlacement.contiguous(4, 2).to_dict()
    with pytest.raises(ValueError, match="exactly the keys"):
        ExpertPlacement.from_dict({k: v for k, v in good.items() if k != "phy2log"})
    with pytest.raises(ValueError, match="list of expert ids"):
        ExpertPlacement.from_dict({**good, "phy2log": "0123"})
    with pytest.raises(ValueError, match="without a slot"):
        ExpertPlacement.from_dict({**good, "phy2log": [0, 0, 1, 2]})


def test_moves_to_itself_is_empty() -> None:
    p = ExpertPlacement.contiguous(16, 4, redundant_slots=4)
    assert p.moves_to(p) == []


def test_moves_list_changed_slots_with_a_source() -> None:
    a = ExpertPlacement(4, 2, 2, (0, 1, 2, 3))
    b = ExpertPlacement(4, 2, 2, (0, 2, 1, 3))
    assert a.moves_to(b) == [(1, 2, 2), (2, 1, 1)]


def test_moves_prefer_a_source_on_the_same_rank() -> None:
    a = ExpertPlacement(3, 2, 2, (0, 1, 2, 0))
    b = ExpertPlacement(3, 2, 2, (1, 0, 2, 1))
    # slot 1 takes expert 0 from slot 0 (its own rank), not from slot 3
    assert a.moves_to(b) == [(0, 1, 1), (1, 0, 0), (3, 1, 1)]


def test_moves_prefer_a_source_that_keeps_its_expert() -> None:
    a = ExpertPlacement(5, 3, 2, (1, 2, 0, 3, 0, 4))
    b = ExpertPlacement(5, 3, 2, (0, 2, 1, 3, 0, 4))
    # expert 0 is in slots 2 and 4; slot 2 is itself overwritten, slot 4 keeps expert 0
    assert a.moves_to(b) == [(0, 0, 4), (2, 1, 0)]


def test_moves_need_the_same_shape() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ExpertPlacement.contiguous(8, 4).moves_to(ExpertPlacement.contiguous(8, 2))


@pytest.mark.parametrize("seed", range(5))
def test_applying_the_moves_gives_the_target(seed: int) -> None:
    rng = random.Random(seed)
    loads = [[rng.expovariate(1.0) for _ in range(32)] for _ in range(2)]
    a, b = (rebalance(load, 8, 5, policy="global") for load in loads)
    slots = list(a.phy2log)
    for slot, new, source in a.moves_to(b):
        assert a.phy2log[source] == new  # the source holds the expert in the old placement
        slots[slot] = a.phy2log[source]
    assert tuple(slots) == b.phy2log
