"""Request placement: which (replica, DP rank) of a pool serves a request.

A replica is one expert-parallel group. Attention inside it is data-parallel, so every rank
schedules its own requests and owns its own paged latent KV cache, with prefix caching keyed by
the block-hash chain of ``moecluster.proto.block_hash``. A prefix hit is worth something only on
the rank that holds the blocks, so the router places requests on ranks, not on replicas.

The router sees each rank through a ``RankView``: its own count of open requests (fresh) and the
worker's stats (waiting sequences, KV usage, cached hashes), refreshed about once a second.
Policies, named by ``router.policy`` in the deployment spec and built by ``make_policy``:

``round_robin``
    Cycles over the healthy targets in (replica, rank) order: after target ``t`` comes the
    smallest healthy target above ``t``, wrapping around, so ranks joining or leaving the pool do
    not reset the cycle.
``least_load``
    The healthy target with the smallest load score::

        load = open_requests + waiting_weight * waiting + kv_weight * kv_usage

    ``open_requests`` is always fresh and is the main term. ``waiting`` (sequences the rank could
    not admit yet) and ``kv_usage`` (cache fullness: the headroom before the rank must preempt)
    may be a second old and refine it. Defaults: ``waiting_weight=1`` (a queued request counts
    twice: it is open, and it shows the rank is saturated) and ``kv_weight=8`` (a full cache
    weighs as much as eight open requests). Ties go to the smallest (replica, rank), so equal
    snapshots give equal answers.
``cache_aware``
    Trades prefix hits against load, in the spirit of SGLang's cache-aware router:

    1. a prompt without a full block has nothing to match: ``least_load``;
    2. a target is *balanced* when ``load <= min_load + balance_abs`` or
       ``load <= balance_rel * min_load`` (minimum over the healthy targets); it is excluded only
       when both the absolute and the relative gap are too large. SGLang applies this test to the
       whole pool and turns cache awareness off when any rank is hot; testing each candidate
       instead keeps placing by cache everywhere else;
    3. among balanced targets the longest prefix match wins (ties: lower load, then smaller
       (replica, rank)), provided it covers ``max(min_match_blocks, min_match_fraction * blocks)``
       of the prompt's blocks; otherwise ``least_load``: a short match saves little prefill, and
       placing fresh prefixes by load spreads them over the pool.

    Defaults: ``balance_abs=4``, ``balance_rel=1.25``, ``min_match_blocks=1``,
    ``min_match_fraction=0.25``. The balance test is tight because the ranks of a replica step in
    lockstep (the MoE all-to-all), so the busiest rank's batch sets the whole replica's step time;
    and a loose one lets the first rank to cache a widely shared prefix (a system prompt) attract
    every new session until its load finally stands out.
``session``
    ``cache_aware`` plus stickiness: the first request of a ``session_id`` is placed by
    ``cache_aware`` and pins the session to its target; later requests of the session go there
    while it is healthy and within ``stick_abs`` / ``stick_rel`` of the least loaded target (the
    balance test above with looser defaults, 8 and 1.5: a session's whole history is cached
    there); otherwise they are placed by ``cache_aware`` again and re-pin. The session table keeps
    the ``max_sessions`` (default 65536) most recently used sessions.

What a rank holds
-----------------
A rank's prefix match is the number of leading blocks of the request's chain that the rank holds,
where "holds" is the union of two sources:

- the hashes the rank last reported (authoritative for what it lists, but up to a second old);
- the router's own record of the chains it placed there (``record``: the prompt at placement, the
  prompt plus output at finish), which knows about a placement before any report can. A recorded
  hash the rank has not reported still counts until ``report_grace`` (default 2) newer reports
  have gone by without it: the first report after the placement may predate it, later ones
  would list it if the rank still cached it. A rank that never reports keeps its records.

The record is bounded: at most ``capacity_blocks`` hashes per rank (default 16384, a few MB),
evicted least recently recorded first. A chain is recorded leaf first, so a prefix is always at
least as recent as anything below it and eviction takes leaves first, as the workers' caches do
(they free a sequence's blocks tail first). Both sources therefore hold prefixes of chains
(if block ``i`` is held, so are blocks ``0..i-1``), which makes "held" monotone along a chain and
lets the match be found by bisection: O(log blocks) set lookups per rank.

A new report is noticed when a view's ``cached`` set differs from the last one seen; the view
refresher should reuse the same frozenset object until the next refresh, so that this check is an
identity test rather than a comparison of two large sets.

All methods run on the router's single asyncio thread; nothing here locks.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

Target = tuple[str, int]  # (replica, rank)


@dataclass(frozen=True)
class RankView:
    """What the router knows about one DP rank, refreshed about once a second."""

    replica: str  # e.g. "decode-0"
    rank: int
    healthy: bool
    open_requests: int  # routed there and not finished (the router's own count, fresh)
    waiting: int  # sequences queued on the rank (worker stats, may be stale)
    kv_usage: float  # fraction of KV blocks in use, 0..1 (stale)
    cached: frozenset[int] = frozenset()  # block hashes the rank reported as cached (stale; may be empty)

    @property
    def target(self) -> Target:
        return (self.replica, self.rank)


@dataclass(frozen=True)
class PlacementRequest:
    request_id: str
    block_hashes: tuple[int, ...]  # chain over the prompt's full blocks
    session_id: str | None = None


class NoHealthyTarget(RuntimeError):
    """No rank of the pool is healthy: the request cannot be placed now."""


class PlacementPolicy(Protocol):
    def choose(self, request: PlacementRequest, ranks: Sequence[RankView]) -> Target:
        """The target for ``request``; raises ``NoHealthyTarget`` when no rank is healthy."""
        ...

    def record(self, target: Target, block_hashes: Sequence[int]) -> None:
        """``block_hashes`` (a chain) now sits in ``target``'s cache."""
        ...

    def forget(self, replica: str) -> None:
        """``replica`` was rebuilt: its caches are empty."""
        ...


def _healthy(ranks: Sequence[RankView]) -> list[RankView]:
    healthy = [v for v in ranks if v.healthy]
    if not healthy:
        raise NoHealthyTarget(f"none of the {len(ranks)} ranks is healthy")
    return healthy


def _within(load: float, min_load: float, gap_abs: float, gap_rel: float) -> bool:
    """Whether ``load`` is close enough to the pool's minimum: within ``gap_abs`` of it, or within
    a factor ``gap_rel`` of it."""
    return load <= min_load + gap_abs or load <= gap_rel * min_load


def _check(name: str, value: float, *, minimum: float, maximum: float = math.inf, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not minimum <= value <= maximum:
        what = "an integer" if integer else "a number"
        bound = f">= {minimum}" if maximum == math.inf else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {what} {bound}, got {value!r}")


@dataclass(kw_only=True, eq=False)
class RoundRobin:
    """``round_robin``: see the module docstring."""

    _last: Target | None = field(default=None, init=False, repr=False)

    def choose(self, request: PlacementRequest, ranks: Sequence[RankView]) -> Target:
        targets = [v.target for v in _healthy(ranks)]
        after = [t for t in targets if self._last is None or t > self._last]
        self._last = min(after or targets)
        return self._last

    def record(self, target: Target, block_hashes: Sequence[int]) -> None:
        """Round robin ignores caches."""

    def forget(self, replica: str) -> None:
        """Round robin ignores caches."""


@dataclass(kw_only=True, eq=False)
class LeastLoad:
    """``least_load``: see the module docstring."""

    waiting_weight: float = 1.0
    kv_weight: float = 8.0

    def __post_init__(self) -> None:
        _check("waiting_weight", self.waiting_weight, minimum=0.0)
        _check("kv_weight", self.kv_weight, minimum=0.0)

    def load(self, view: RankView) -> float:
        """The load score; see the module docstring."""
        return view.open_requests + self.waiting_weight * view.waiting + self.kv_weight * view.kv_usage

    def choose(self, request: PlacementRequest, ranks: Sequence[RankView]) -> Target:
        return self._least_loaded(_healthy(ranks))

    def _least_loaded(self, healthy: Sequence[RankView]) -> Target:
        return min(healthy, key=lambda v: (self.load(v), v.target)).target

    def record(self, target: Target, block_hashes: Sequence[int]) -> None:
        """Least load ignores caches."""

    def forget(self, replica: str) -> None:
        """Least load ignores caches."""


@dataclass(eq=False)
class _RankIndex:
    """What the router believes one rank caches: its latest report plus the chains recorded there."""

    capacity: int
    grace: int
    recorded: OrderedDict[int, int] = field(default_factory=OrderedDict)  # hash -> generation; oldest first
    report: frozenset[int] = frozenset()
    generation: int = 0  # non-empty reports seen so far

    def observe(self, report: frozenset[int]) -> None:
        if report is not self.report and report != self.report:
            self.report = report
            if report:
                self.generation += 1

    def add(self, chain: Sequence[int]) -> None:
        for h in reversed(chain):  # leaf first: the root ends up most recent, so leaves go first
            self.recorded[h] = self.generation
            self.recorded.move_to_end(h)
        while len(self.recorded) > self.capacity:
            self.recorded.popitem(last=False)

    def holds(self, block_hash: int) -> bool:
        if block_hash in self.report:
            return True
        generation = self.recorded.get(block_hash)
        return generation is not None and self.generation - generation < self.grace

    def match(self, chain: Sequence[int]) -> int:
        """Leading blocks of ``chain`` held, by bisection ("held" is monotone along a chain)."""
        lo, hi = 0, len(chain)  # blocks [0, lo) are held, blocks [hi, len) are not
        while lo < hi:
            mid = (lo + hi) // 2
            if self.holds(chain[mid]):
                lo = mid + 1
            else:
                hi = mid
        return lo


@dataclass(kw_only=True, eq=False)
class CacheAware(LeastLoad):
    """``cache_aware``: see the module docstring. Its knobs include ``least_load``'s weights."""

    balance_abs: float = 4.0
    balance_rel: float = 1.25
    min_match_blocks: int = 1
    min_match_fraction: float = 0.25
    capacity_blocks: int = 16384
    report_grace: int = 2
    _indexes: dict[str, dict[int, _RankIndex]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check("balance_abs", self.balance_abs, minimum=0.0)
        _check("balance_rel", self.balance_rel, minimum=1.0)
        _check("min_match_blocks", self.min_match_blocks, minimum=1, integer=True)
        _check("min_match_fraction", self.min_match_fraction, minimum=0.0, maximum=1.0)
        _check("capacity_blocks", self.capacity_blocks, minimum=1, integer=True)
        _check("report_grace", self.report_grace, minimum=1, integer=True)

    def choose(self, request: PlacementRequest, ranks: Sequence[RankView]) -> Target:
        healthy = _healthy(ranks)
        chain = request.block_hashes
        if not chain:
            return self._least_loaded(healthy)
        loads = [self.load(v) for v in healthy]
        min_load = min(loads)
        balanced = [(v, load) for v, load in zip(healthy, loads, strict=True)
                    if _within(load, min_load, self.balance_abs, self.balance_rel)]
        best, _, matched = min(((v, load, self.match(v, chain)) for v, load in balanced),
                               key=lambda c: (-c[2], c[1], c[0].target))
        need = max(self.min_match_blocks, math.ceil(self.min_match_fraction * len(chain)))
        return best.target if matched >= need else self._least_loaded(healthy)

    def match(self, view: RankView, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of ``block_hashes`` the router expects ``view``'s rank to hold
        (noting the view's report first, if it is a new one)."""
        index = self._index(view.target)
        index.observe(view.cached)
        return index.match(block_hashes)

    def record(self, target: Target, block_hashes: Sequence[int]) -> None:
        self._index(target).add(block_hashes)

    def forget(self, replica: str) -> None:
        self._indexes.pop(replica, None)

    def indexed_blocks(self, target: Target) -> int:
        """Hashes the router has recorded for ``target`` (at most ``capacity_blocks``)."""
        index = self._indexes.get(target[0], {}).get(target[1])
        return 0 if index is None else len(index.recorded)

    def _index(self, target: Target) -> _RankIndex:
        replica, rank = target
        by_rank = self._indexes.setdefault(replica, {})
        if rank not in by_rank:
            by_rank[rank] = _RankIndex(self.capacity_blocks, self.report_grace)
        return by_rank[rank]


@dataclass(kw_only=True, eq=False)
class SessionAffinity(CacheAware):
    """``session``: see the module docstring. Its knobs include ``cache_aware``'s."""

    stick_abs: float = 8.0
    stick_rel: float = 1.5
    max_sessions: int = 65536
    _sessions: OrderedDict[str, Target] = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check("stick_abs", self.stick_abs, minimum=0.0)
        _check("stick_rel", self.stick_rel, minimum=1.0)
        _check("max_sessions", self.max_sessions, minimum=1, integer=True)

    def choose(self, request: PlacementRequest, ranks: Sequence[RankView]) -> Target:
        session = request.session_id
        if session is None:
            return super().choose(request, ranks)
        pinned = self._sessions.get(session)
        if pinned is not None:
            healthy = _healthy(ranks)
            view = next((v for v in healthy if v.target == pinned), None)
            min_load = min(self.load(v) for v in healthy)
            if view is not None and _within(self.load(view), min_load, self.stick_abs, self.stick_rel):
                self._sessions.move_to_end(session)
                return pinned
        target = super().choose(request, ranks)
        self._sessions[session] = target
        self._sessions.move_to_end(session)
        if len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return target

    def forget(self, replica: str) -> None:
        """Drops the replica's caches and unpins its sessions: with the history gone, the next turn
        is placed afresh like any other request."""
        super().forget(replica)
        for session in [s for s, (r, _) in self._sessions.items() if r == replica]:
            del self._sessions[session]


_POLICIES: dict[str, type[RoundRobin] | type[LeastLoad]] = {
    "round_robin": RoundRobin,
    "least_load": LeastLoad,
    "cache_aware": CacheAware,
    "session": SessionAffinity,
}


def make_policy(name: str, **options: object) -> PlacementPolicy:
    """The policy ``name`` (``round_robin``, ``least_load``, ``cache_aware``, ``session``) with its
    knobs set from ``options``; ``ValueError`` names an unknown policy, option or bad value."""
    cls = _POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown placement policy {name!r}; expected one of {', '.join(_POLICIES)}")
    known = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"placement policy {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options are: {', '.join(known) or 'none'}")
    return cls(**options)
