"""Request placement policies: round robin, least load, cache-aware and session affinity."""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moecluster.proto.block_hash import block_hashes
from moecluster.router.requests.placement import (
    CacheAware,
    NoHealthyTarget,
    PlacementPolicy,
    PlacementRequest,
    RankView,
    SessionAffinity,
    Target,
    make_policy,
)

BLOCK = 16
POLICIES = ("round_robin", "least_load", "cache_aware", "session")


def pool(n: int = 4, replica: str = "decode-0") -> list[RankView]:
    """``n`` healthy, idle ranks of one replica."""
    return [RankView(replica, r, healthy=True, open_requests=0, waiting=0, kv_usage=0.0) for r in range(n)]


def with_load(views: list[RankView], **open_requests: int) -> list[RankView]:
    """``views`` with ``open_requests`` set per rank, named r0, r1, ..."""
    return [replace(v, open_requests=open_requests.get(f"r{v.rank}", v.open_requests)) for v in views]


def chain(tokens: Sequence[int]) -> tuple[int, ...]:
    return tuple(block_hashes(tokens, BLOCK))


def request(hashes: Sequence[int] = (), session: str | None = None) -> PlacementRequest:
    return PlacementRequest("req", tuple(hashes), session)


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(50_000) for _ in range(n)]


# ---- round robin and least load ----------------------------------------------------------------


def test_round_robin_cycles_over_healthy_targets_in_stable_order() -> None:
    policy = make_policy("round_robin")
    views = pool(2, "decode-1") + pool(2, "decode-0")
    views[1] = replace(views[1], healthy=False)  # decode-1 rank 1
    picks = [policy.choose(request(), views[::-1] if i % 2 else views) for i in range(6)]
    assert picks == [("decode-0", 0), ("decode-0", 1), ("decode-1", 0)] * 2
    # a target leaving the pool does not reset the cycle
    assert policy.choose(request(), [v for v in views if v.target != ("decode-0", 0)]) == ("decode-0", 1)


def test_least_load_minimises_the_documented_score() -> None:
    views = [
        RankView("d", 0, True, open_requests=2, waiting=0, kv_usage=0.0),
        RankView("d", 1, True, open_requests=0, waiting=1, kv_usage=0.2),
        RankView("d", 2, True, open_requests=1, waiting=0, kv_usage=0.1),
    ]
    # defaults (waiting 1, kv 8): 2, 2.6, 1.8
    assert make_policy("least_load").choose(request(), views) == ("d", 2)
    assert make_policy("least_load", waiting_weight=0, kv_weight=0).choose(request(), views) == ("d", 1)
    assert make_policy("least_load", waiting_weight=0, kv_weight=20).choose(request(), views) == ("d", 0)


def test_least_load_breaks_ties_by_replica_then_rank() -> None:
    views = pool(2, "b") + pool(2, "a")
    assert make_policy("least_load").choose(request(), views) == ("a", 0)
    assert make_policy("least_load").choose(request(), with_load(views, r0=1)) == ("a", 1)


@pytest.mark.parametrize("name", POLICIES)
def test_unhealthy_ranks_are_never_chosen(name: str) -> None:
    policy = make_policy(name)
    hashes = chain(list(range(64)))
    views = [replace(v, healthy=v.rank == 3, open_requests=0 if v.rank != 3 else 50, cached=frozenset(hashes))
             for v in pool(4)]
    policy.record(("decode-0", 0), hashes)
    for _ in range(8):
        assert policy.choose(request(hashes, session="s"), views) == ("decode-0", 3)


@pytest.mark.parametrize("name", POLICIES)
def test_no_healthy_target_raises(name: str) -> None:
    policy = make_policy(name)
    with pytest.raises(NoHealthyTarget):
        policy.choose(request(), [replace(v, healthy=False) for v in pool(3)])
    with pytest.raises(NoHealthyTarget):
        policy.choose(request(session="s"), [])


# ---- cache aware -------------------------------------------------------------------------------


def test_cache_aware_follows_the_routers_own_record() -> None:
    rng = random.Random(0)
    prefix = random_tokens(rng, 40 * BLOCK)
    policy = make_policy("cache_aware")
    policy.record(("decode-0", 2), chain(prefix))
    prompt = chain(prefix[: 30 * BLOCK] + random_tokens(rng, 5 * BLOCK))
    views = with_load(pool(4), r0=0, r1=1, r2=4, r3=2)  # the holder is busier, but balanced
    assert policy.choose(request(prompt), views) == ("decode-0", 2)


def test_cache_aware_follows_reported_hashes() -> None:
    rng = random.Random(1)
    prefix = random_tokens(rng, 20 * BLOCK)
    views = with_load(pool(4), r1=3)
    views[1] = replace(views[1], cached=frozenset(chain(prefix)))
    prompt = chain(prefix + random_tokens(rng, 3 * BLOCK))
    assert make_policy("cache_aware").choose(request(prompt), views) == ("decode-0", 1)


def test_cache_aware_prefers_the_longer_prefix_then_the_lower_load() -> None:
    rng = random.Random(2)
    prompt = chain(random_tokens(rng, 24 * BLOCK))
    policy = make_policy("cache_aware")
    policy.record(("decode-0", 0), prompt[:10])
    policy.record(("decode-0", 1), prompt[:20])
    policy.record(("decode-0", 3), prompt[:20])
    views = with_load(pool(4), r1=4, r3=3)
    assert policy.choose(request(prompt), views) == ("decode-0", 3)


def test_cache_aware_falls_back_to_least_load_when_the_holder_is_overloaded() -> None:
    rng = random.Random(3)
    prompt = chain(random_tokens(rng, 32 * BLOCK))
    policy = make_policy("cache_aware", balance_abs=8, balance_rel=1.5)
    policy.record(("decode-0", 0), prompt)
    # 9 above the minimum and more than 1.5x it: excluded
    assert policy.choose(request(prompt), with_load(pool(3), r0=20, r1=11, r2=12)) == ("decode-0", 1)
    # a large absolute gap alone is fine while the relative one is small, and vice versa
    assert policy.choose(request(prompt), with_load(pool(3), r0=40, r1=30, r2=31)) == ("decode-0", 0)
    assert policy.choose(request(prompt), with_load(pool(3), r0=8, r1=0, r2=1)) == ("decode-0", 0)


def test_cache_aware_ignores_short_matches_and_blockless_prompts() -> None:
    rng = random.Random(4)
    prompt = chain(random_tokens(rng, 20 * BLOCK))
    policy = make_policy("cache_aware", min_match_fraction=0.25, min_match_blocks=2)
    views = with_load(pool(2), r0=1)
    policy.record(("decode-0", 0), prompt[:4])  # 4 of 20 blocks < 25 %
    assert policy.choose(request(prompt), views) == ("decode-0", 1)
    policy.record(("decode-0", 0), prompt[:5])
    assert policy.choose(request(prompt), views) == ("decode-0", 0)
    policy.record(("decode-0", 0), prompt[:1])
    assert policy.choose(request(prompt[:1]), views) == ("decode-0", 1)  # 1 block < min_match_blocks
    assert policy.choose(request(()), views) == ("decode-0", 1)


def test_forget_drops_a_replicas_record() -> None:
    rng = random.Random(5)
    prompt = chain(random_tokens(rng, 16 * BLOCK))
    policy = make_policy("cache_aware")
    assert isinstance(policy, CacheAware)
    policy.record(("decode-0", 1), prompt)
    policy.record(("decode-1", 0), prompt)
    policy.forget("decode-0")
    assert policy.indexed_blocks(("decode-0", 1)) == 0
    assert policy.indexed_blocks(("decode-1", 0)) == len(prompt)
    views = pool(2, "decode-0") + with_load(pool(1, "decode-1"), r0=2)
    assert policy.choose(request(prompt), views) == ("decode-1", 0)
    policy.forget("decode-1")
    assert policy.choose(request(prompt), views) == ("decode-0", 0)


def test_record_is_lru_bounded_per_rank_and_evicts_leaves_first() -> None:
    rng = random.Random(6)
    policy = CacheAware(capacity_blocks=10)
    target, view = ("decode-0", 0), pool(1)[0]
    long = chain(random_tokens(rng, 25 * BLOCK))
    policy.record(target, long)
    assert policy.indexed_blocks(target) == 10
    assert policy.match(view, long) == 10  # the first ten blocks survive, not the last ten
    other = chain(random_tokens(rng, 6 * BLOCK))
    policy.record(target, other)
    assert policy.indexed_blocks(target) == 10
    assert policy.match(view, other) == 6 and policy.match(view, long) == 4
    policy.record(target, long[:2])  # touching a prefix makes it the most recent
    policy.record(target, chain(random_tokens(rng, 7 * BLOCK)))
    assert policy.match(view, long) == 2 and policy.match(view, other) == 1
    for _ in range(50):
        policy.record(target, chain(random_tokens(rng, rng.randrange(1, 8) * BLOCK)))
        assert policy.indexed_blocks(target) <= 10
    assert policy.indexed_blocks(("decode-0", 1)) == 0


def test_recorded_hashes_count_until_reports_have_had_time_to_show_them() -> None:
    rng = random.Random(7)
    policy = CacheAware(report_grace=2)
    old, placed = chain(random_tokens(rng, 8 * BLOCK)), chain(random_tokens(rng, 8 * BLOCK))
    view = replace(pool(1)[0], cached=frozenset(old))
    assert policy.match(view, old) == 8  # reported, never recorded
    policy.record(view.target, placed)
    assert policy.match(view, placed) == 8  # recorded, not reported yet
    view = replace(view, cached=frozenset(old[:4]))  # first report after the placement may predate it
    assert policy.match(view, placed) == 8 and policy.match(view, old) == 4
    assert policy.match(view, placed) == 8  # the same report seen again is not a new one
    view = replace(view, cached=frozenset(old[:3]))  # a second report still without it: evicted
    assert policy.match(view, placed) == 0
    policy.record(view.target, placed[:5])  # recorded again: counts again
    assert policy.match(view, placed) == 5


def test_make_policy_rejects_unknown_names_options_and_values() -> None:
    for name in POLICIES:
        make_policy(name)
    with pytest.raises(ValueError, match="'fastest'"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="'kv_weight'"):
        make_policy("round_robin", kv_weight=1.0)
    with pytest.raises(ValueError, match="'stick_abs'"):
        make_policy("cache_aware", stick_abs=1.0)
    with pytest.raises(ValueError, match="capacity_blocks"):
        make_policy("cache_aware", capacity_blocks=0)
    with pytest.raises(ValueError, match="min_match_fraction"):
        make_policy("session", min_match_fraction=1.5)
    with pytest.raises(ValueError, match="balance_rel"):
        make_policy("session", balance_rel=0.5)
    assert isinstance(make_policy("session", stick_abs=4, capacity_blocks=100), SessionAffinity)


# ---- session affinity --------------------------------------------------------------------------


def test_a_fifty_turn_agent_session_stays_on_one_target() -> None:
    rng = random.Random(8)
    policy = make_policy("session")
    assert isinstance(policy, SessionAffinity)
    views = pool(4, "decode-0") + pool(4, "decode-1")
    background: deque[Target] = deque()  # other traffic, finishing in FIFO order
    prompt = random_tokens(rng, 300)
    targets, previous = [], ()
    for _ in range(50):
        for _ in range(rng.randrange(4)):
            background.append(policy.choose(request(chain(random_tokens(rng, 200))), views))
        while len(background) > 12:
            background.popleft()
        views = [replace(v, open_requests=background.count(v.target), waiting=rng.randrange(2),
                         kv_usage=rng.uniform(0.2, 0.5)) for v in views]
        hashes = chain(prompt)
        target = policy.choose(request(hashes, session="agent"), views)
        policy.record(target, hashes)
        assert policy.match(next(v for v in views if v.target == target), hashes) == len(hashes)
        assert hashes[: len(previous)] == previous
        targets.append(target)
        prompt = prompt + random_tokens(rng, rng.randrange(20, 200))  # the output
        previous = chain(prompt)
        policy.record(target, previous)
        prompt = prompt + random_tokens(rng, rng.randrange(10, 100))  # the next message
    assert len(set(targets)) == 1


def test_session_repicks_when_its_target_is_unhealthy_or_overloaded_and_re_sticks() -> None:
    rng = random.Random(9)
    policy = make_policy("session", stick_abs=4, stick_rel=2.0)
    hashes = chain(random_tokens(rng, 8 * BLOCK))
    views = pool(3)
    first = policy.choose(request(hashes, "s"), views)
    assert first == ("decode-0", 0)
    policy.record(first, hashes)
    # pinned within the cap even though cache_aware alone would now pick by load
    assert policy.choose(request((), "s"), with_load(views, r0=4)) == first
    assert policy.choose(request((), "s"), with_load(views, r0=5)) == ("decode-0", 1)
    assert policy.choose(request((), "s"), with_load(views, r1=3, r2=3)) == ("decode-0", 1)  # re-stuck
    down = [replace(v, healthy=v.rank != 1) for v in views]
    assert policy.choose(request((), "s"), down) == ("decode-0", 0)
    policy.forget("decode-0")
    assert policy.choose(request((), "s"), with_load(views, r0=1)) == ("decode-0", 1)  # unpinned


def test_session_table_is_lru_bounded() -> None:
    policy = make_policy("session", max_sessions=2)
    views = pool(3)
    assert policy.choose(request((), "a"), views) == ("decode-0", 0)
    assert policy.choose(request((), "b"), with_load(views, r0=1)) == ("decode-0", 1)
    assert policy.choose(request((), "a"), with_load(views, r0=1, r1=1)) == ("decode-0", 0)  # touch a
    assert policy.choose(request((), "c"), with_load(views, r0=1, r1=1)) == ("decode-0", 2)  # evicts b
    loads = with_load(views, r0=1, r1=1, r2=1)
    assert policy.choose(request((), "a"), loads) == ("decode-0", 0)
    assert policy.choose(request((), "c"), loads) == ("decode-0", 2)
    assert policy.choose(request((), "b"), with_load(views, r0=1, r1=2, r2=1)) == ("decode-0", 0)


# ---- simulated hit rate --------------------------------------------------------------------------


class SimulatedRank:
    """A rank's prefix cache: LRU over block hashes, freed tail first like the workers' cache."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.blocks = capacity, OrderedDict[int, None]()

    def hit(self, hashes: Sequence[int]) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.blocks:
            n += 1
        return n

    def store(self, hashes: Sequence[int]) -> None:
        for h in reversed(hashes):
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


def simulated_hit_fraction(name: str, seed: int = 10) -> float:
    """12 concurrent agent sessions of 15 turns over 4 ranks, sharing a system prompt; up to 7
    requests in flight, rank reports refreshed every 5 placements. Caches hold 1000 blocks, enough
    for a rank's share of the sessions but not for a copy of every session on every rank."""
    rng = random.Random(seed)
    policy = make_policy(name)
    ranks = {("decode-0", r): SimulatedRank(capacity=1000) for r in range(4)}
    reports = {t: frozenset[int]() for t in ranks}
    system = random_tokens(rng, 64)
    prompts = {f"s{i}": system + random_tokens(rng, 40) for i in range(12)}
    turns_left = dict.fromkeys(prompts, 15)
    in_flight: deque[tuple[Target, str]] = deque()
    hit = total = placed = 0

    def finish() -> None:
        target, session = in_flight.popleft()
        prompts[session] += random_tokens(rng, 30)  # the output
        ranks[target].store(chain(prompts[session]))
        policy.record(target, chain(prompts[session]))
        prompts[session] += random_tokens(rng, 100)  # the next message: a tool result

    while any(turns_left.values()):
        order = [s for s, left in turns_left.items() if left and all(s != x for _, x in in_flight)]
        rng.shuffle(order)
        for session in order:
            if placed % 5 == 0:
                reports = {t: frozenset(rank.blocks) for t, rank in ranks.items()}
            views = [RankView(*t, True, sum(t == u for u, _ in in_flight), 0, 0.0, reports[t]) for t in ranks]
            hashes = chain(prompts[session])
            target = policy.choose(request(hashes, session), views)
            hit, total, placed = hit + ranks[target].hit(hashes), total + len(hashes), placed + 1
            ranks[target].store(hashes)
            policy.record(target, hashes)
            in_flight.append((target, session))
            turns_left[session] -= 1
            if len(in_flight) > 6:
                finish()
        while in_flight:
            finish()
    return hit / total


def test_cache_and_session_aware_placement_hit_far_more_prefix_blocks_than_round_robin() -> None:
    fractions = {name: simulated_hit_fraction(name) for name in POLICIES}
    # each turn appends about 8 new blocks, so about 0.9 is the most any placement can hit
    assert fractions["cache_aware"] > 0.85 and fractions["session"] > 0.85, fractions
    assert fractions["round_robin"] < 0.7, fractions
    for name in ("cache_aware", "session"):  # less than half the misses
        assert 1 - fractions[name] < 0.5 * (1 - fractions["round_robin"]), fractions


# ---- property ------------------------------------------------------------------------------------

HASHES = chain(list(range(8 * BLOCK)))

rank_views = st.builds(
    RankView,
    replica=st.sampled_from(["decode-0", "decode-1", "prefill-0"]),
    rank=st.integers(0, 3),
    healthy=st.booleans(),
    open_requests=st.integers(0, 100),
    waiting=st.integers(0, 20),
    kv_usage=st.floats(0.0, 1.0),
    cached=st.integers(0, len(HASHES)).map(lambda n: frozenset(HASHES[:n])),
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(POLICIES),
    views=st.lists(rank_views, max_size=8, unique_by=lambda v: v.target),
    records=st.lists(st.tuples(st.sampled_from(["decode-0", "decode-1"]), st.integers(0, 3),
                               st.integers(0, len(HASHES))), max_size=6),
    requests=st.lists(st.tuples(st.integers(0, len(HASHES)), st.sampled_from([None, "a", "b"])),
                      min_size=1, max_size=5),
)
def test_choose_returns_a_healthy_target_from_the_list(
    name: str, views: list[RankView], records: list[tuple[str, int, int]], requests: list[tuple[int, str | None]],
) -> None:
    policy: PlacementPolicy = make_policy(name, capacity_blocks=5) if name in ("cache_aware", "session") \
        else make_policy(name)
    for replica, rank, n in records:
        policy.record((replica, rank), HASHES[:n])
    healthy = {v.target for v in views if v.healthy}
    for n, session in requests:
        if not healthy:
            with pytest.raises(NoHealthyTarget):
                policy.choose(request(HASHES[:n], session), views)
        else:
            assert policy.choose(request(HASHES[:n], session), views) in healthy
