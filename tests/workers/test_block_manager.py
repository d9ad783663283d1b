"""BlockManager: unit tests per method, then a Hypothesis state machine against a shadow cache."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from moecluster.proto.block_hash import block_hashes
from moecluster.workers.engine.block_manager import BlockManager, BlockTable, OutOfBlocks

BS = 4


def run_prompt(bm: BlockManager, tokens: list[int]) -> BlockTable:
    """Admit a prompt as the scheduler would: reuse the cached prefix, grow, compute, commit."""
    table = BlockTable([])
    bm.allocate_prefix(table, tokens)
    bm.grow(table, len(tokens))
    bm.commit(table, tokens, len(tokens))
    return table


# ---- construction and capacity ------------------------------------------------------------------
def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_capacity_and_blocks_needed() -> None:
    bm = BlockManager(8, BS)
    assert (bm.num_blocks, bm.block_size, bm.capacity_tokens, bm.num_free_blocks) == (8, BS, 32, 8)
    table = BlockTable([])
    assert [bm.blocks_needed(table, n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    bm.grow(table, 5)
    assert [bm.blocks_needed(table, n) for n in (0, 5, 8, 9)] == [0, 0, 0, 1]
    assert bm.can_allocate(6) and not bm.can_allocate(7)
    with pytest.raises(IndexError):
        bm.ref_count(8)


# ---- grow and free ------------------------------------------------------------------------------
def test_grow_hands_out_low_ids_and_is_all_or_nothing() -> None:
    bm = BlockManager(4, BS)
    table = BlockTable([])
    bm.grow(table, 9)
    assert table.block_ids == [0, 1, 2]
    assert [bm.ref_count(b) for b in range(4)] == [1, 1, 1, 0]
    with pytest.raises(OutOfBlocks):
        bm.grow(table, 17)  # needs 2 more, 1 free
    assert table.block_ids == [0, 1, 2] and bm.num_free_blocks == 1
    bm.grow(table, 16)
    assert bm.num_free_blocks == 0


def test_free_clears_the_table_and_is_idempotent() -> None:
    bm = BlockManager(4, BS)
    table = run_prompt(bm, list(range(6)))
    assert table.num_hashed == 1 and table.last_hash is not None
    bm.free(table)
    assert table == BlockTable([])
    assert bm.num_free_blocks == 4 and all(bm.ref_count(b) == 0 for b in range(4))
    bm.free(table)  # second free: nothing left to drop
    assert bm.num_free_blocks == 4


def test_refcount_going_negative_is_a_bug() -> None:
    bm = BlockManager(4, BS)
    table = BlockTable([])
    bm.grow(table, 4)
    stale = BlockTable(list(table.block_ids))  # a copy the manager never handed out
    bm.free(table)
    with pytest.raises(AssertionError, match="freed more often"):
        bm.free(stale)


# ---- prefix caching -----------------------------------------------------------------------------
def test_prefix_hit_shares_blocks_and_counts_tokens() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a = run_prompt(bm, prompt)
    assert bm.stats().num_cached_blocks == 2

    b = BlockTable([])
    assert bm.allocate_prefix(b, prompt[:9] + [99]) == 8
    assert b.block_ids == a.block_ids[:2]
    assert (b.num_hashed, b.last_hash) == (2, block_hashes(prompt, BS)[1])
    assert [bm.ref_count(x) for x in a.block_ids] == [2, 2, 1]

    c = BlockTable([])
    assert bm.allocate_prefix(c, [0, 1, 2, 3, 7, 7, 7, 7]) == 4  # second block differs
    assert c.block_ids == a.block_ids[:1] and c.num_hashed == 1
    s = bm.stats()
    assert (s.prefix_queries, s.prefix_hits) == (10 + 10 + 8, 0 + 8 + 4)  # a, b, c


def test_prefix_hit_leaves_at_least_one_token_to_compute() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(8))  # exactly 2 full blocks, both cached
    run_prompt(bm, prompt)
    table = BlockTable([])
    assert bm.allocate_prefix(table, prompt) == 4
    assert len(table.block_ids) == 1 and table.num_hashed == 1
    assert bm.allocate_prefix(BlockTable([]), [0]) == 0
    assert bm.allocate_prefix(BlockTable([]), []) == 0


def test_allocate_prefix_needs_an_empty_table() -> None:
    bm = BlockManager(4, BS)
    table = BlockTable([])
    bm.grow(table, 1)
    with pytest.raises(ValueError, match="empty"):
        bm.allocate_prefix(table, [1, 2, 3])


def test_chain_state_follows_the_spec_and_extra() -> None:
    prompt = list(range(13))
    for extra in (b"", b"model-a"):
        bm = BlockManager(8, BS, hash_extra=extra)
        table = BlockTable([])
        bm.grow(table, 13)
        bm.commit(table, prompt, 6)  # block 0 done, block 1 half computed
        assert (table.num_hashed, table.last_hash) == (1, block_hashes(prompt, BS, extra)[0])
        bm.commit(table, prompt, 13)
        assert (table.num_hashed, table.last_hash) == (3, block_hashes(prompt, BS, extra)[2])
    assert block_hashes(prompt, BS) != block_hashes(prompt, BS, b"model-a")


def test_commit_rejects_uncomputable_counts() -> None:
    bm = BlockManager(4, BS)
    table = BlockTable([])
    bm.grow(table, 4)
    with pytest.raises(ValueError, match="num_computed"):
        bm.commit(table, list(range(8)), 5)  # table holds only 4 tokens
    with pytest.raises(ValueError, match="num_computed"):
        bm.commit(table, [1, 2], 3)


def test_duplicate_hash_keeps_the_first_block() -> None:
    bm = BlockManager(8, BS)
    prompt = list(range(8))
    a, b = BlockTable([]), BlockTable([])
    for t in (a, b):  # both admitted before either computed: no sharing possible
        bm.allocate_prefix(t, prompt)
        bm.grow(t, 8)
    bm.commit(a, prompt, 8)
    bm.commit(b, prompt, 8)
    assert b.num_hashed == 2 and b.last_hash == a.last_hash
    assert bm.stats().num_cached_blocks == 2  # b's identical blocks stay unregistered
    bm.free(a)
    bm.free(b)
    c = BlockTable([])
    bm.allocate_prefix(c, prompt + [1])
    assert c.block_ids == a.block_ids or c.block_ids == [0, 1]


def test_prefix_caching_off() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    prompt = list(range(9))
    a = run_prompt(bm, prompt)
    assert (a.num_hashed, a.last_hash) == (0, None)
    b = BlockTable([])
    assert bm.allocate_prefix(b, prompt) == 0 and b.block_ids == []
    s = bm.stats()
    assert (s.num_cached_blocks, s.prefix_queries, s.prefix_hits) == (0, 0, 0)


# ---- eviction policy ----------------------------------------------------------------------------
def test_fresh_blocks_first_then_least_recently_freed() -> None:
    bm = BlockManager(6, BS)
    a = run_prompt(bm, list(range(8)))  # blocks 0, 1, hashed
    b = run_prompt(bm, list(range(100, 108)))  # blocks 2, 3, hashed
    bm.free(b)  # freed tail first: 3 then 2
    bm.free(a)  # then 1, 0
    assert bm.num_free_blocks == 6 and bm.stats().num_cached_blocks == 4
    t = BlockTable([])
    bm.grow(t, 8)
    assert t.block_ids == [4, 5] and bm.stats().evictions == 0  # never-hashed blocks first
    bm.grow(t, 16)
    assert t.block_ids == [4, 5, 3, 2] and bm.stats().evictions == 2  # then LRU, b's tail first
    assert bm.stats().num_cached_blocks == 2
    assert bm.allocate_prefix(BlockTable([]), list(range(100, 109))) == 0  # b's hashes are gone
    assert bm.allocate_prefix(BlockTable([]), list(range(9))) == 8  # a's survive


def test_prefix_hit_revives_an_evictable_block() -> None:
    bm = BlockManager(4, BS)
    a = run_prompt(bm, list(range(8)))  # blocks 0, 1
    bm.free(a)  # evictable, LRU order 1, 0
    hit = BlockTable([])
    assert bm.allocate_prefix(hit, list(range(5))) == 4  # takes block 0 out of the pool
    assert bm.num_free_blocks == 3 and bm.stats().usage == 0.25
    t = BlockTable([])
    bm.grow(t, 12)  # blocks 2, 3 fresh, then evicts 1; 0 is referenced and safe
    assert t.block_ids == [2, 3, 1] and bm.stats().evictions == 1
    with pytest.raises(OutOfBlocks):
        bm.grow(t, 16)
    assert bm.stats().num_cached_blocks == 1


# ---- fork ---------------------------------------------------------------------------------------
def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    bm = BlockManager(8, BS)
    prompt = list(range(10))
    parent = run_prompt(bm, prompt)
    child, copies = bm.fork(parent, 10)
    assert child.block_ids[:2] == parent.block_ids[:2]
    assert copies == [(parent.block_ids[2], child.block_ids[2])]
    assert child.block_ids[2] not in parent.block_ids
    assert [bm.ref_count(b) for b in parent.block_ids] == [2, 2, 1]
    assert (child.num_hashed, child.last_hash) == (parent.num_hashed, parent.last_hash)
    bm.grow(child, 12)
    bm.commit(child, prompt + [50, 51], 12)  # the child's own third block
    assert child.last_hash == block_hashes(prompt + [50, 51], BS)[2]

    aligned, copies = bm.fork(parent, 8)
    assert aligned.block_ids == parent.block_ids[:2] and copies == []


def test_fork_earlier_than_the_parent_hashed() -> None:
    bm = BlockManager(8, BS)
    prompt = list(range(12))
    parent = run_prompt(bm, prompt)
    child, copies = bm.fork(parent, 6)  # one full block shared, block 1 copied
    assert (child.num_hashed, child.last_hash) == (1, block_hashes(prompt, BS)[0])
    assert copies == [(parent.block_ids[1], child.block_ids[1])]
    empty, copies = bm.fork(parent, 0)
    assert empty.block_ids == [] and copies == [] and empty.num_hashed == 0
    with pytest.raises(ValueError):
        bm.fork(parent, 13)


def test_fork_without_a_free_block_changes_nothing() -> None:
    bm = BlockManager(2, BS)
    parent = BlockTable([])
    bm.grow(parent, 6)
    with pytest.raises(OutOfBlocks):
        bm.fork(parent, 6)
    assert [bm.ref_count(b) for b in parent.block_ids] == [1, 1] and bm.num_free_blocks == 0
    child, _ = bm.fork(parent, 4)  # block-aligned forks need no new block
    assert bm.ref_count(parent.block_ids[0]) == 2


def test_stats() -> None:
    bm = BlockManager(4, BS)
    t = run_prompt(bm, list(range(6)))
    s = bm.stats()
    assert (s.num_blocks, s.num_free_blocks, s.num_cached_blocks, s.usage) == (4, 2, 1, 0.5)
    bm.free(t)
    assert bm.stats().usage == 0.0 and bm.stats().num_cached_blocks == 1


# ---- state machine ------------------------------------------------------------------------------
BASES = [[0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1], [0, 1, 0, 1, 2, 2, 2, 2, 1, 0, 1, 0], [2, 1, 2, 1, 0, 0, 1, 1]]


@dataclass(eq=False)  # identity: two sequences may hold equal tokens
class Seq:
    tokens: list[int]
    table: BlockTable = field(default_factory=lambda: BlockTable([]))
    computed: int = 0  # leading tokens written to the shadow cache


class CacheMachine(RuleBasedStateMachine):
    """Drives the manager like a scheduler and checks it against a shadow of the device cache."""

    @initialize(num_blocks=st.integers(3, 14), block_size=st.sampled_from([1, 2, 4]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size, hash_extra=b"test")
        self.bs = block_size
        self.device: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.expected: dict[int, tuple[int, ...]] = {}  # hash -> the tokens of the block it names
        self.live: list[Seq] = []
        self.preempted: list[Seq] = []

    def _admit(self, seq: Seq) -> None:
        seq.table = BlockTable([])
        cached = self.bm.allocate_prefix(seq.table, seq.tokens)
        assert cached % self.bs == 0 and cached < len(seq.tokens)
        for i, block in enumerate(seq.table.block_ids):  # a hit never returns foreign content
            assert self.device[block] == seq.tokens[i * self.bs : (i + 1) * self.bs]
        seq.computed = cached
        self.live.append(seq)

    def _pick(self, i: int) -> Seq:
        return self.live[i % len(self.live)]

    @rule(base=st.integers(0, len(BASES) - 1), cut=st.integers(0, 12), suffix=st.lists(st.integers(0, 2), max_size=6))
    def add(self, base: int, cut: int, suffix: list[int]) -> None:
        self._admit(Seq(BASES[base][:cut] + suffix or [0]))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99), chunk=st.integers(1, 9))
    def step(self, i: int, chunk: int) -> None:
        seq = self._pick(i)
        if seq.computed == len(seq.tokens):  # decode: the last sampled token still needs its latent
            seq.tokens.append(chunk % 3)
        target = min(seq.computed + chunk, len(seq.tokens))
        before = (list(seq.table.block_ids), self.bm.num_free_blocks)
        try:
            self.bm.grow(seq.table, target)
        except OutOfBlocks:
            assert (seq.table.block_ids, self.bm.num_free_blocks) == before
            return
        for p in range(seq.computed, target):  # the forward pass writes these latents
            self.device[seq.table.block_ids[p // self.bs]][p % self.bs] = seq.tokens[p]
        seq.computed = target
        self.bm.commit(seq.table, seq.tokens, target)
        full = target // self.bs
        for j, h in enumerate(block_hashes(seq.tokens[: full * self.bs], self.bs, b"test")):
            block = tuple(seq.tokens[j * self.bs : (j + 1) * self.bs])
            assert self.expected.setdefault(h, block) == block
        assert seq.table.num_hashed == full

    @precondition(lambda self: any(s.computed for s in self.live))
    @rule(i=st.integers(0, 99), cut=st.integers(0, 99))
    def fork(self, i: int, cut: int) -> None:
        parent = [s for s in self.live if s.computed][i % sum(1 for s in self.live if s.computed)]
        n = 1 + cut % parent.computed
        before = [self.bm.ref_count(b) for b in range(self.bm.num_blocks)]
        try:
            table, copies = self.bm.fork(parent.table, n)
        except OutOfBlocks:
            assert [self.bm.ref_count(b) for b in range(self.bm.num_blocks)] == before
            return
        for src, dst in copies:
            self.device[dst] = list(self.device[src])
        self.live.append(Seq(parent.tokens[:n], table, n))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99), twice=st.booleans())
    def finish_or_abort(self, i: int, twice: bool) -> None:
        seq = self._pick(i)
        self.live.remove(seq)
        self.bm.free(seq.table)
        if twice:
            self.bm.free(seq.table)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99))
    def preempt(self, i: int) -> None:
        seq = self._pick(i)
        self.live.remove(seq)
        self.bm.free(seq.table)
        self.preempted.append(seq)

    @precondition(lambda self: self.preempted)
    @rule()
    def resume(self) -> None:
        self._admit(self.preempted.pop(0))

    @invariant()
    def refcounts_match_live_tables(self) -> None:
        held = Counter(b for s in self.live for b in s.table.block_ids)
        for s in self.live:
            assert len(set(s.table.block_ids)) == len(s.table.block_ids)
        assert all(self.bm.ref_count(b) == held[b] for b in range(self.bm.num_blocks))
        assert self.bm.num_free_blocks + len(held) == self.bm.num_blocks
        assert self.bm.stats().usage == len(held) / self.bm.num_blocks

    @invariant()
    def computed_tokens_are_intact(self) -> None:
        for s in self.live:
            for p in range(s.computed):
                assert self.device[s.table.block_ids[p // self.bs]][p % self.bs] == s.tokens[p]

    @invariant()
    def registry_points_at_matching_content(self) -> None:
        registry = self.bm._block_of  # white-box: hash -> block
        assert {b: h for h, b in registry.items()} == self.bm._hash_of
        assert self.bm.stats().num_cached_blocks == len(registry)
        for h, block in registry.items():
            assert tuple(self.device[block]) == self.expected[h]

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for s in self.live:
            self.bm.free(s.table)
        assert all(self.bm.ref_count(b) == 0 for b in range(self.bm.num_blocks))
        assert self.bm.num_free_blocks == self.bm.num_blocks


CacheMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestCacheMachine = CacheMachine.TestCase
