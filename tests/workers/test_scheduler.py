"""Scheduler: unit tests per behaviour, then a Hypothesis state machine driving it like the engine.

No model anywhere: `Harness.step` does what `EngineCore.step` does around the forward pass. The
forward itself is a shadow of the paged cache: the slot of position p of a sequence receives the
"latent" ``tuple(token_ids[:p + 1])`` (a latent depends on the whole prefix), fork copies happen
after the writes as in `ModelRunner.execute`, and every sequence's computed positions are checked
to still hold its own prefix. Then `update`, one appended token per sampler, and stop/length.
Every `Harness.step` also checks the SchedulerOutput against the state before it (`after_schedule`:
budget, max_num_seqs, FCFS, preemption from the back, forks, prefix-cache use), so the unit tests
and the state machine share one statement of the contract.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from moecluster.workers.engine.block_manager import BlockManager, OutOfBlocks
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from moecluster.workers.engine.sequence import Sequence, SeqStatus


class ForkScheduledTwice(AssertionError):
    """A sibling created by a fork this step also got a row (or a sample) of its own: the bug the
    regression tests below pin down."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Harness:
    """A scheduler plus what the engine does around it, and a shadow of the device cache."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        max_model_len: int = 64,
        max_num_seqs: int = 256,
        budget: int | None = None,
        chunked: bool = True,
        prefix: bool = True,
    ) -> None:
        budget = budget if budget is not None else (64 if chunked else max_model_len)
        self.cfg = SchedulerConfig(max_model_len, max_num_seqs, budget, chunked)
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
        self.s = Scheduler(self.cfg, self.bm)
        self.bs = block_size
        self.arrivals = itertools.count()
        self.kv: dict[int, tuple[int, ...]] = {}  # slot -> the prefix whose latent it holds
        self.seqs: list[Sequence] = []  # every sequence ever seen, forks included
        self.seen: set[str] = set()  # what happened so far (reported as Hypothesis events)

    # ---- what EngineCore.add_request does -----------------------------------------------------
    def add(self, rid: str, prompt: list[int], max_tokens: int | None = 16, n: int = 1) -> Sequence:
        limit = self.cfg.max_model_len
        assert 0 < len(prompt) < limit
        max_len = limit if max_tokens is None else min(len(prompt) + max_tokens, limit)
        assert max_len <= self.bm.capacity_tokens, "the engine refuses this request"
        params = SamplingParams(n=n, max_tokens=max_tokens)
        seq = Sequence(rid, 0, list(prompt), len(prompt), params, max_len, next(self.arrivals))
        self.s.add(seq)
        self.seqs.append(seq)
        return seq

    # ---- the device side ----------------------------------------------------------------------
    def slot(self, seq: Sequence, p: int) -> int:
        return seq.table.block_ids[p // self.bs] * self.bs + p % self.bs

    def intact(self, seq: Sequence, upto: int | None = None) -> bool:
        upto = seq.num_computed if upto is None else upto
        return all(self.kv.get(self.slot(seq, p)) == tuple(seq.token_ids[: p + 1]) for p in range(upto))

    def forward(self, out: SchedulerOutput) -> None:
        for s in out.scheduled:  # attention reads the context computed so far
            assert self.intact(s.seq), f"{s.seq.request_id}/{s.seq.sample_index} reads a clobbered context"
        for s in out.scheduled:
            seq = s.seq
            for p in range(seq.num_computed, seq.num_computed + s.num_tokens):
                self.kv[self.slot(seq, p)] = tuple(seq.token_ids[: p + 1])
        for src, dst in out.block_copies:  # after the forward's writes, as ModelRunner.execute does
            for off in range(self.bs):
                value = self.kv.get(src * self.bs + off)
                if value is None:
                    self.kv.pop(dst * self.bs + off, None)
                else:
                    self.kv[dst * self.bs + off] = value

    # ---- what EngineCore.step does ------------------------------------------------------------
    def step(
        self,
        token: Callable[[Sequence], int] = lambda seq: 0,
        stop: Callable[[Sequence], bool] = lambda seq: False,
    ) -> SchedulerOutput:
        self._before = (list(self.s.running), list(self.s.waiting), self.s.has_unfinished())
        out = self.s.schedule()
        self.after_schedule(out)
        self.forward(out)
        self.s.update(out)
        for seq, _ in out.samplers:
            if seq not in self.seqs:
                self.seqs.append(seq)
            seq.token_ids.append(token(seq))
            if len(seq.token_ids) >= seq.max_len:
                self.s.finish(seq, "length")
            elif stop(seq):
                self.s.finish(seq, "stop")
        return out


    def drain(self, max_steps: int = 10_000, **kw) -> int:
        steps = 0
        while self.s.has_unfinished():
            assert steps < max_steps, "the scheduler stopped making progress"
            self.step(**kw)
            steps += 1
        return steps

    # ---- accounting -----------------------------------------------------------------------------
    def live(self) -> list[Sequence]:
        return [*self.s.waiting, *self.s.running]

    def assert_no_leaks(self) -> None:
        held = Counter(b for seq in self.live() for b in seq.table.block_ids)
        refs = {b: self.bm.ref_count(b) for b in range(self.bm.num_blocks) if self.bm.ref_count(b)}
        assert refs == dict(held)
        assert self.bm.num_free_blocks + len(refs) == self.bm.num_blocks
        assert all(not seq.table.block_ids for seq in self.seqs if seq.finished)

    def assert_empty(self) -> None:
        assert not self.s.waiting and not self.s.running and not self.s.has_unfinished()
        assert all(self.bm.ref_count(b) == 0 for b in range(self.bm.num_blocks))
        assert self.bm.num_free_blocks == self.bm.num_blocks

    # ---- the scheduler's contract, checked on every step() ---------------------------------------
    def after_schedule(self, out: SchedulerOutput) -> None:
        """Check the SchedulerOutput against the state the scheduler was in before it."""
        running0, waiting0, busy = self._before
        cfg, s = self.cfg, self.s
        # the budget, and progress whenever there is work
        assert out.num_tokens <= cfg.max_num_batched_tokens
        assert not busy or not out.empty, "a step with work scheduled nothing"
        # rows: distinct running sequences, each within its tokens and its table
        seqs = [x.seq for x in out.scheduled]
        forked_now = {seq for seq, row in out.samplers if out.scheduled[row].seq is not seq}
        assert forked_now == set(out.forked)
        if forked_now & set(seqs):
            raise ForkScheduledTwice("a sibling forked this step also has a row of its own")
        assert len(set(seqs)) == len(seqs)
        for x in out.scheduled:
            seq = x.seq
            assert seq.status is SeqStatus.RUNNING and seq in s.running
            assert x.num_tokens >= 1
            assert seq.num_computed + x.num_tokens <= len(seq.token_ids)
            assert len(seq.table.block_ids) * self.bs >= seq.num_computed + x.num_tokens
            assert x.sample == (seq.num_computed + x.num_tokens == len(seq.token_ids))
            if not cfg.enable_chunked_prefill:
                assert x.sample, "without chunked prefill a prompt is never split"
        # samplers: every completing row samples, forks share their parent's row
        sampler_seqs = [seq for seq, _ in out.samplers]
        if len(set(sampler_seqs)) != len(sampler_seqs):
            raise ForkScheduledTwice("a sequence samples twice in one step")
        assert {row for _, row in out.samplers} == {i for i, x in enumerate(out.scheduled) if x.sample}
        for seq, row in out.samplers:
            parent = out.scheduled[row].seq
            if seq is not parent:
                assert seq.request_id == parent.request_id and seq.sample_index != parent.sample_index
                assert seq.token_ids == parent.token_ids and seq.num_computed == 0
                assert seq.status is SeqStatus.RUNNING and seq in s.running
                assert seq.table.block_ids[: len(seq.token_ids) // self.bs] == parent.table.block_ids[
                    : len(parent.token_ids) // self.bs
                ]
        for src, dst in out.block_copies:
            assert self.bm.ref_count(dst) == 1
            assert any(dst in seq.table.block_ids for seq in forked_now)
            assert any(src in x.seq.table.block_ids for x in out.scheduled)
        # preemption: from the back of the running list, to the front of the queue, and then
        # nothing is admitted
        k = len(out.preempted)
        assert out.preempted == running0[::-1][:k]
        for seq in out.preempted:
            assert seq.status is SeqStatus.WAITING and not seq.table.block_ids and seq.num_computed == 0
        new_waiting = [seq for seq in s.waiting if seq not in waiting0]  # preempted, or failed forks
        assert set(out.preempted) <= set(new_waiting)
        assert list(s.waiting)[: len(new_waiting)] == new_waiting
        admitted = [seq for seq in waiting0 if seq in s.running]
        assert admitted == waiting0[: len(admitted)], "admission is first come, first served"
        if out.preempted:
            assert not admitted
        for seq in admitted:
            assert seq.num_cached % self.bs == 0 and seq.num_cached < len(seq.token_ids)
            assert seq.num_cached == 0 or self.bm.enable_prefix_caching
            if seq.num_cached == 0 and not self.bm.enable_prefix_caching:
                continue
            # the cache was used: at least the registered blocks of any sequence still running
            # whose tokens it shares (those blocks are referenced, so they cannot be evicted)
            limit = (len(seq.token_ids) - 1) // self.bs
            for other in running0:
                if other in out.preempted:
                    continue
                shared = 0
                while (shared < min(limit, other.table.num_hashed)
                       and other.table.block_ids[shared] in self.bm._hash_of  # white-box: registered
                       and other.token_ids[: (shared + 1) * self.bs] == seq.token_ids[: (shared + 1) * self.bs]):
                    shared += 1
                assert seq.num_cached >= shared * self.bs, "a prefix-cache hit was missed"
        self._note(out, forked_now, new_waiting, admitted)
        assert s.running[: len(running0) - k] == running0[: len(running0) - k]
        # max_num_seqs bounds the running set, forks included (an unforked request counts n)
        assert len(s.running) <= cfg.max_num_seqs and len(out.scheduled) <= cfg.max_num_seqs

    def _note(self, out, forked_now, new_waiting, admitted) -> None:
        seen = self.seen
        if out.preempted:
            seen.add("preempted")
            if len(out.preempted) > 1:
                seen.add("preempted several")
        if forked_now:
            seen.add("forked")
        if set(new_waiting) - set(out.preempted):
            seen.add("fork without a free block")
        if out.block_copies:
            seen.add("copied a partial block")
        if any(not x.sample for x in out.scheduled):
            seen.add("split a prompt")
        if any(seq.num_cached for seq in admitted):
            seen.add("prefix hit")
        if any(seq.output_ids for seq in admitted):
            seen.add("resumed")
        if self.bm.stats().evictions:
            seen.add("evicted")


def rows(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    """(request, sample index, tokens, samples) per scheduled row."""
    return [(s.seq.request_id, s.seq.sample_index, s.num_tokens, s.sample) for s in out.scheduled]


def toks(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


# ==== configuration =============================================================================
@pytest.mark.parametrize("field", ["max_model_len", "max_num_seqs", "max_num_batched_tokens"])
def test_config_rejects_non_positive(field: str) -> None:
    kw = {"max_model_len": 8, "max_num_seqs": 4, "max_num_batched_tokens": 8, field: 0}
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kw)


def test_config_without_chunking_needs_a_whole_prompt_per_step() -> None:
    with pytest.raises(ValueError, match="chunked prefill"):
        SchedulerConfig(max_model_len=16, max_num_batched_tokens=15, enable_chunked_prefill=False)
    SchedulerConfig(max_model_len=16, max_num_batched_tokens=15, enable_chunked_prefill=True)
    SchedulerConfig(max_model_len=16, max_num_batched_tokens=16, enable_chunked_prefill=False)


def test_empty_scheduler() -> None:
    h = Harness(4, 4)
    assert not h.s.has_unfinished()
    out = h.s.schedule()
    assert out.empty and out.num_tokens == 0 and not out.samplers and not out.preempted


# ==== admission ===================================================================================
def test_fcfs_admission_and_max_num_seqs() -> None:
    h = Harness(32, 4, max_num_seqs=2)
    a, b, c, d = (h.add(r, toks(3, 10 * i)) for i, r in enumerate("abcd"))
    out = h.step()
    assert rows(out) == [("a", 0, 3, True), ("b", 0, 3, True)]
    assert list(h.s.waiting) == [c, d] and h.s.running == [a, b]
    assert [s.status for s in (a, b, c, d)] == [SeqStatus.RUNNING] * 2 + [SeqStatus.WAITING] * 2
    assert rows(h.step()) == [("a", 0, 1, True), ("b", 0, 1, True)]  # full: c keeps waiting
    h.s.finish(b, "stop")
    out = h.step()
    assert rows(out) == [("a", 0, 1, True), ("c", 0, 3, True)]  # c before d
    assert h.s.running == [a, c] and list(h.s.waiting) == [d]
    h.drain()
    h.assert_empty()


def test_head_of_line_blocks_later_requests() -> None:
    """FCFS: a prompt that does not fit this step's budget is not overtaken by a shorter one."""
    h = Harness(32, 4, max_model_len=16, budget=16, chunked=False)
    h.add("a", toks(10))
    h.add("b", toks(10, 200))
    h.add("c", toks(2, 300))
    out = h.step()
    assert rows(out) == [("a", 0, 10, True)]  # b (10) does not fit the 6 left; c must not jump it
    out = h.step()
    assert rows(out) == [("a", 0, 1, True), ("b", 0, 10, True), ("c", 0, 2, True)]


def test_token_budget_is_respected_and_filled() -> None:
    h = Harness(64, 4, budget=7)  # checks the budget on every schedule()
    for i in range(5):
        h.add(f"r{i}", toks(9 + i, 20 * i), max_tokens=5)
    # prompt work exceeds the budget for the first steps: every step uses all of it
    assert [h.step().num_tokens for _ in range(8)] == [7] * 8
    while h.s.has_unfinished():
        assert 0 < h.step().num_tokens <= 7
    h.assert_empty()


def test_max_num_seqs_bounds_running_and_rows() -> None:
    h = Harness(64, 2, max_num_seqs=3)
    for i in range(7):
        h.add(f"r{i}", toks(1 + i % 3, 10 * i), max_tokens=1 + i % 4)
    while h.s.has_unfinished():
        out = h.step()
        assert len(out.scheduled) <= 3 and len(h.s.running) <= 3
    h.assert_empty()


# ==== chunked prefill ===============================================================================
def test_chunked_prefill_splits_a_long_prompt_and_only_the_last_chunk_samples() -> None:
    h = Harness(16, 4, budget=4)
    a = h.add("a", toks(10))
    chunks = []
    for _ in range(3):
        out = h.step()
        chunks.append(rows(out))
        if chunks[-1][0][3] is False:
            assert out.samplers == []
    assert chunks == [[("a", 0, 4, False)], [("a", 0, 4, False)], [("a", 0, 2, True)]]
    assert a.num_computed == 10 and len(a.token_ids) == 11
    assert rows(h.step()) == [("a", 0, 1, True)]


def test_chunked_prefill_shares_the_step_with_decodes() -> None:
    h = Harness(16, 4, budget=4)
    h.add("a", toks(2))
    h.step()  # a: prompt
    h.add("b", toks(9, 200))
    assert rows(h.step()) == [("a", 0, 1, True), ("b", 0, 3, False)]
    assert rows(h.step()) == [("a", 0, 1, True), ("b", 0, 3, False)]
    assert rows(h.step()) == [("a", 0, 1, True), ("b", 0, 3, True)]


def test_without_chunking_a_prompt_is_never_split() -> None:
    h = Harness(64, 4, max_model_len=12, budget=12, chunked=False)  # asserts no split rows
    h.add("a", toks(3), max_tokens=6)
    h.step()
    h.add("b", toks(11, 200), max_tokens=1)  # needs 11 of the 12; a's decode takes 1
    assert rows(h.step()) == [("a", 0, 1, True), ("b", 0, 11, True)]
    h.add("c", toks(11, 300), max_tokens=1)
    h.add("d", toks(11, 400), max_tokens=1)
    out = h.step()  # a decodes (1), c fits the 11 left, d does not fit what is left
    assert rows(out) == [("a", 0, 1, True), ("c", 0, 11, True)]
    h.drain()
    h.assert_empty()


def test_decodes_are_scheduled_before_admissions() -> None:
    h = Harness(64, 4, budget=5)
    a = h.add("a", toks(4))
    b = h.add("b", toks(4, 200))
    h.step()  # a: 4, b: 1 (chunk)
    h.add("c", toks(4, 300))
    out = h.step()
    assert [s.seq for s in out.scheduled] == [a, b, h.seqs[2]]
    assert rows(out) == [("a", 0, 1, True), ("b", 0, 3, True), ("c", 0, 1, False)]


# ==== preemption ===============================================================================
def test_preemption_frees_the_most_recent_and_admits_nothing() -> None:
    h = Harness(4, 4, prefix=False)
    a = h.add("a", toks(7), max_tokens=8)
    b = h.add("b", toks(7, 200), max_tokens=8)
    h.step()  # both prompts: 2 blocks each, cache full
    assert h.bm.num_free_blocks == 0
    h.step()  # position 7 still fits the second block of each
    b_blocks = list(b.table.block_ids)
    c = h.add("c", toks(1, 300), max_tokens=1)
    out = h.step()  # a needs a third block: b (admitted last) goes
    assert out.preempted == [b]
    assert rows(out) == [("a", 0, 1, True)]  # c is not admitted in a step that preempted
    assert b.status is SeqStatus.WAITING and b.table.block_ids == [] and b.num_computed == b.num_cached == 0
    assert list(h.s.waiting) == [b, c] and h.s.running == [a]
    assert all(h.bm.ref_count(x) == 0 for x in b_blocks if x not in a.table.block_ids)
    assert h.bm.num_free_blocks == 1
    h.assert_no_leaks()


def test_a_sequence_that_cannot_grow_preempts_itself() -> None:
    h = Harness(4, 2, prefix=False)
    a = h.add("a", toks(5), max_tokens=3)  # 3 blocks
    b = h.add("b", toks(2, 200), max_tokens=3)  # 1 block
    h.step()
    out = h.step()  # a: position 5 fits its third block; b: position 2 needs a block, none free
    assert rows(out) == [("a", 0, 1, True)] and out.preempted == [b]
    assert list(h.s.waiting) == [b] and h.s.running == [a]
    h.drain()
    h.assert_empty()
    assert len(a.output_ids) == 3 and len(b.output_ids) == 3


@pytest.mark.parametrize("prefix", [False, True])
def test_preempted_sequence_resumes_and_recomputes_prompt_and_output(prefix: bool) -> None:
    h = Harness(4, 4, prefix=prefix)
    a = h.add("a", toks(7), max_tokens=4)
    b = h.add("b", toks(7, 200), max_tokens=8)
    token = iter(range(500, 600))
    h.step(token=lambda s: next(token))
    h.step(token=lambda s: next(token))
    out = h.step(token=lambda s: next(token))
    assert out.preempted == [b]
    generated = list(b.output_ids)
    assert len(b.token_ids) == 9 and len(generated) == 2
    out = h.step(token=lambda s: next(token))  # a takes its last token and finishes
    assert a.finish_reason == "length" and b.status is SeqStatus.WAITING
    out = h.step(token=lambda s: next(token))
    assert out.scheduled[0].seq is b
    # recompute: the prompt and the two generated tokens. With prefix caching b's first block comes
    # back from the cache; its second (positions 4..7, freed first) was evicted for a's third block.
    cached = b.num_cached
    assert cached == (4 if prefix else 0)
    assert rows(out) == [("b", 0, 9 - cached, True)]
    assert b.output_ids[:2] == generated and len(b.output_ids) == 3
    h.drain()
    h.assert_empty()


def test_preempted_resume_is_chunked_too() -> None:
    h = Harness(4, 4, budget=3, prefix=False)
    a = h.add("a", toks(3), max_tokens=13)
    b = h.add("b", toks(7, 200), max_tokens=9)
    for _ in range(50):
        if h.step().preempted:
            break
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.output_ids
    while a.status is SeqStatus.RUNNING:
        h.step()
    need, sizes = len(b.token_ids), []
    while not sizes or not out.scheduled[0].sample:
        out = h.step()
        sizes.append(rows(out)[0][2])
    assert sum(sizes) == need and max(sizes) == 3


def test_prompt_too_big_for_the_empty_cache_raises() -> None:
    """The engine refuses such requests; the scheduler fails loudly rather than spinning."""
    h = Harness(3, 4)
    seq = Sequence("x", 0, toks(13), 13, SamplingParams(max_tokens=1), 14, 0)
    h.s.add(seq)
    with pytest.raises(OutOfBlocks, match="does not fit the empty cache"):
        h.s.schedule()


# ==== prefix caching =============================================================================
def test_prefix_hits_are_block_multiples_and_never_the_whole_prompt() -> None:
    h = Harness(32, 4)
    base = toks(10)
    h.add("a", base, max_tokens=1)
    h.drain()
    cases = [
        (base, 8),  # same prompt: 2 full blocks, the partial third block recomputed
        (base[:8], 4),  # exactly 2 full blocks cached: the last one is recomputed for its logits
        (base[:9], 8),
        (base[:4] + [7] * 6, 4),
        ([7] + base[1:], 0),
        (base[:3], 0),
    ]
    for i, (prompt, hit) in enumerate(cases):
        seq = h.add(f"q{i}", prompt, max_tokens=1)
        out = h.step()
        assert (seq.num_cached, seq.num_computed) == (hit, len(prompt))
        assert rows(out) == [(f"q{i}", 0, len(prompt) - hit, True)]
        h.drain()
    h.assert_empty()


def test_prefix_hits_share_blocks_while_both_run() -> None:
    h = Harness(32, 4)
    a = h.add("a", toks(10), max_tokens=5)
    h.step()
    b = h.add("b", toks(10), max_tokens=5)
    out = h.step()
    assert b.num_cached == 8 and rows(out)[1] == ("b", 0, 2, True)
    assert b.table.block_ids[:2] == a.table.block_ids[:2]
    assert [h.bm.ref_count(x) for x in a.table.block_ids] == [2, 2, 1]
    assert b.table.block_ids[2] != a.table.block_ids[2]
    h.s.abort("a")
    assert [h.bm.ref_count(x) for x in b.table.block_ids] == [1, 1, 1]
    h.assert_no_leaks()


def test_no_prefix_hits_when_caching_is_off() -> None:
    h = Harness(32, 4, prefix=False)
    h.add("a", toks(10), max_tokens=1)
    h.drain()
    b = h.add("b", toks(10), max_tokens=1)
    assert rows(h.step()) == [("b", 0, 10, True)] and b.num_cached == 0


# ==== n > 1 ======================================================================================
def test_fork_in_the_step_that_completes_the_prompt() -> None:
    h = Harness(16, 4)
    p = h.add("a", toks(10), n=3, max_tokens=4)
    out = h.s.schedule()
    assert rows(out) == [("a", 0, 10, True)]
    sibs = [seq for seq, _ in out.samplers]
    assert sibs[0] is p and [s.sample_index for s in sibs] == [0, 1, 2]
    assert [row for _, row in out.samplers] == [0, 0, 0]  # one row of logits, three samples
    assert all(s.request_id == "a" and s.forked and s.status is SeqStatus.RUNNING for s in sibs)
    assert h.s.running == sibs
    full = p.table.block_ids[:2]
    assert all(s.table.block_ids[:2] == full for s in sibs)
    assert [h.bm.ref_count(x) for x in full] == [3, 3]
    partial = [s.table.block_ids[2] for s in sibs]
    assert len(set(partial)) == 3 and all(h.bm.ref_count(x) == 1 for x in partial)
    assert out.block_copies == [(partial[0], partial[1]), (partial[0], partial[2])]
    h.forward(out)
    h.s.update(out)
    assert [s.num_computed for s in sibs] == [10, 10, 10]
    assert all(h.intact(s) for s in sibs)
    for i, s in enumerate(sibs):
        s.token_ids.append(i)
    out = h.step()
    assert rows(out) == [("a", 0, 1, True), ("a", 1, 1, True), ("a", 2, 1, True)]
    assert [(s, r) for s, r in out.samplers] == [(sibs[0], 0), (sibs[1], 1), (sibs[2], 2)]
    h.drain()
    h.assert_empty()
    assert all(len(s.output_ids) == 4 for s in sibs)


def test_fork_of_a_block_aligned_prompt_copies_nothing() -> None:
    h = Harness(16, 4)
    p = h.add("a", toks(8), n=2, max_tokens=3)
    out = h.step()
    s1 = out.samplers[1][0]
    assert out.block_copies == [] and s1.table.block_ids == p.table.block_ids
    assert [h.bm.ref_count(x) for x in p.table.block_ids] == [2, 2]
    out = h.step()  # position 8 opens a new block for each
    assert p.table.block_ids[2] != s1.table.block_ids[2]
    h.drain()
    h.assert_empty()


def test_fork_without_a_free_block_sends_the_sibling_to_wait() -> None:
    h = Harness(3, 4)
    p = h.add("a", toks(10), n=2, max_tokens=2)  # 3 blocks, partial last: no block for the copy
    out = h.step()
    assert [s for s, _ in out.samplers] == [p] and out.block_copies == []
    (sib,) = h.s.waiting
    assert sib.request_id == "a" and sib.sample_index == 1 and sib.forked
    assert sib.table.block_ids == [] and sib.num_computed == 0 and sib.token_ids == toks(10)
    h.assert_no_leaks()
    out = h.step()  # the parent decodes; the sibling still does not fit
    assert rows(out) == [("a", 0, 1, True)] and list(h.s.waiting) == [sib]
    h.assert_no_leaks()
    out = h.step()  # parent finished last step: the sibling recomputes from the prefix cache
    assert p.finish_reason == "length"
    assert sib.num_cached == 8 and rows(out) == [("a", 1, 2, True)]
    assert [s for s, _ in out.samplers] == [sib]  # no second fork
    h.drain()
    h.assert_empty()
    assert len(sib.output_ids) == 2


def test_siblings_forked_by_a_final_prompt_chunk_are_not_scheduled_again() -> None:
    """Regression: forks made in the running loop used to join `running` while that loop still
    iterated it, so a sibling recomputed the prompt in a row of its own and sampled twice."""
    h = Harness(16, 4, budget=8)
    h.add("c", toks(6, 200), max_tokens=3)
    a = h.add("a", toks(4), n=2, max_tokens=3)
    assert rows(h.step()) == [("c", 0, 6, True), ("a", 0, 2, False)]
    out = h.step()  # a's final chunk forks a1; 5 tokens of budget are left
    (a1,) = out.forked
    assert rows(out) == [("c", 0, 1, True), ("a", 0, 2, True)]
    assert [(seq, row) for seq, row in out.samplers] == [(h.seqs[0], 0), (a, 1), (a1, 1)]
    assert h.s.running == [h.seqs[0], a, a1] and len(a1.token_ids) == 5
    h.drain()
    h.assert_empty()


def test_forks_respect_max_num_seqs() -> None:
    """Regression: an unforked n > 1 request takes n running slots when it is admitted."""
    h = Harness(16, 4, max_num_seqs=3)
    h.add("a", toks(5), n=3, max_tokens=2)
    h.step()
    assert len(h.s.running) == 3
    assert len(h.step().scheduled) == 3
    h.assert_empty()


def test_an_unforked_request_waits_for_n_slots_and_blocks_the_queue() -> None:
    h = Harness(32, 4, max_num_seqs=3)
    a = h.add("a", toks(3), max_tokens=3)
    h.step()
    b = h.add("b", toks(3, 200), n=3, max_tokens=2)
    c = h.add("c", toks(3, 300), max_tokens=2)
    out = h.step()  # 1 running + 3 for b > 3: b waits, and c does not overtake it
    assert rows(out) == [("a", 0, 1, True)] and list(h.s.waiting) == [b, c]
    out = h.step()  # a finishes (3 tokens) in this step, after scheduling: b still waits
    assert a.finished and list(h.s.waiting) == [b, c]
    out = h.step()
    assert rows(out) == [("b", 0, 3, True)] and len(out.samplers) == 3 and list(h.s.waiting) == [c]
    h.drain()
    h.assert_empty()
    assert c.finish_reason == "length"


# ==== finish and abort =============================================================================
def test_abort_of_a_waiting_request() -> None:
    h = Harness(2, 4, prefix=False)
    h.add("a", toks(7), max_tokens=1)
    b = h.add("b", toks(3, 200), max_tokens=1)
    h.s.schedule()  # a holds both blocks; b waits
    assert list(h.s.waiting) == [b]
    assert h.s.abort("b") == [b]
    assert b.finish_reason == "abort" and b.finished and not h.s.waiting
    assert h.s.abort("b") == [] and h.s.abort("nope") == []
    h.assert_no_leaks()


def test_abort_of_a_running_request_frees_its_blocks() -> None:
    h = Harness(8, 4)
    a = h.add("a", toks(10), max_tokens=4)
    h.step()
    assert h.bm.num_free_blocks == 5
    assert h.s.abort("a") == [a]
    assert a.status is SeqStatus.FINISHED and a.finish_reason == "abort" and a.table.block_ids == []
    h.assert_empty()


def test_abort_of_a_forked_request_frees_every_sample() -> None:
    h = Harness(8, 4)
    h.add("a", toks(6), n=3, max_tokens=4)
    h.add("b", toks(2, 200), max_tokens=4)
    out = h.step()
    forks = [s for s, _ in out.samplers if s.request_id == "a"]
    assert len(forks) == 3
    aborted = h.s.abort("a")
    assert set(aborted) == set(forks) and all(s.finish_reason == "abort" for s in aborted)
    assert [s.request_id for s in h.s.running] == ["b"]
    h.assert_no_leaks()
    h.s.abort("b")
    h.assert_empty()


def test_abort_of_a_forked_request_with_a_waiting_sibling() -> None:
    h = Harness(3, 4)
    h.add("a", toks(10), n=3, max_tokens=2)
    h.step()
    assert len(h.s.running) == 1 and len(h.s.waiting) == 2
    assert len(h.s.abort("a")) == 3
    h.assert_empty()


def test_finish_is_idempotent_and_has_unfinished() -> None:
    h = Harness(8, 4)
    a = h.add("a", toks(3))
    assert h.s.has_unfinished()
    h.step()
    h.s.finish(a, "stop", 7)
    assert (a.finish_reason, a.stop_reason) == ("stop", 7)
    h.s.finish(a, "stop", 7)
    assert not h.s.has_unfinished()
    h.assert_empty()


# ==== KV hand-off (prefill/decode split) =================================================================
def test_add_running_decodes_a_handed_over_sequence_next_step() -> None:
    h = Harness(8, 4)
    seq = Sequence("x", 0, toks(7), 6, SamplingParams(max_tokens=4), 10, 0)  # prompt + first token
    h.bm.grow(seq.table, 7)
    seq.num_computed = 6  # the prompt's latents arrived; the first token still needs its own
    for p in range(6):
        h.kv[h.slot(seq, p)] = tuple(seq.token_ids[: p + 1])
    h.s.add_running(seq)
    h.seqs.append(seq)
    assert seq.status is SeqStatus.RUNNING and h.s.has_unfinished()
    assert rows(h.step()) == [("x", 0, 1, True)]
    h.drain()
    h.assert_empty()
    assert seq.finish_reason == "length" and len(seq.token_ids) == 10


def test_detach_keeps_the_blocks_until_the_caller_frees_them() -> None:
    h = Harness(8, 4)
    a = h.add("a", toks(6), max_tokens=4)
    h.step()
    blocks = list(a.table.block_ids)
    h.s.detach(a)
    assert a.status is SeqStatus.FINISHED and not h.s.has_unfinished()
    assert [h.bm.ref_count(b) for b in blocks] == [1, 1] and h.bm.num_free_blocks == 6
    assert h.s.abort("a") == [] and a.table.block_ids == blocks  # abort does not see it
    assert h.s.schedule().empty
    h.bm.free(a.table)  # after the transfer was acknowledged
    h.assert_empty()


# ==== state machine ==============================================================================
BASES = [[0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 2, 0], [0, 1, 0, 1, 2, 2, 2, 2, 1, 0, 1, 0], [2, 1, 2, 1, 0, 0, 1, 1]]


class SchedulerMachine(RuleBasedStateMachine):
    CHUNKED_FORKS_ONLY = False  # a subclass below concentrates on n > 1 under chunked prefill

    @initialize(
        num_blocks=st.integers(2, 16),
        block_size=st.sampled_from([1, 2, 3, 4]),
        max_model_len=st.integers(4, 40),
        chunked=st.booleans(),
        prefix=st.booleans(),
        extra_budget=st.integers(0, 12),
        max_num_seqs=st.integers(1, 6),
    )
    def setup(self, num_blocks, block_size, max_model_len, chunked, prefix, extra_budget, max_num_seqs) -> None:
        chunked = chunked or self.CHUNKED_FORKS_ONLY
        budget = max_model_len + extra_budget if not chunked else 1 + extra_budget
        self.h = Harness(
            num_blocks, block_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            budget=budget, chunked=chunked, prefix=prefix,
        )
        self.ids = itertools.count()
        self.requests: list[str] = []
        self.broken = False

    def _guard(self) -> None:
        self.broken = True  # cleared by a rule that got to its end; teardown skips a broken run

    @rule(
        base=st.integers(0, len(BASES) - 1),
        cut=st.integers(0, 14),
        suffix=st.lists(st.integers(0, 2), max_size=6),
        max_tokens=st.integers(1, 12),
        n=st.sampled_from([1, 1, 2, 3]),
    )
    def add(self, base: int, cut: int, suffix: list[int], max_tokens: int, n: int) -> None:
        self._guard()
        h = self.h
        # respect the engine's admission rule (EngineCore.check): shorten what a client would
        prompt = (BASES[base][:cut] + suffix)[: min(h.cfg.max_model_len - 1, h.bm.capacity_tokens - 1)] or [0]
        max_tokens = max(1, min(max_tokens, h.bm.capacity_tokens - len(prompt)))
        if self.CHUNKED_FORKS_ONLY:
            n = max(n, 2)
        n = min(n, h.cfg.max_num_seqs)  # EngineCore.check refuses n > max_num_seqs
        rid = f"r{next(self.ids)}"
        h.add(rid, prompt, max_tokens=max_tokens, n=n)
        self.requests.append(rid)
        self.broken = False

    @rule(seed=st.integers(0, 2**16), stop_percent=st.sampled_from([0, 5, 30]), steps=st.integers(1, 4))
    def step(self, seed: int, stop_percent: int, steps: int) -> None:
        self._guard()
        rng = random.Random(seed)
        for _ in range(steps):
            self.h.step(token=lambda seq: rng.randrange(3), stop=lambda seq: rng.randrange(100) < stop_percent)
            self.check()
        self.broken = False

    @rule(i=st.integers(0, 99))
    def abort(self, i: int) -> None:
        self._guard()
        rid = self.requests.pop(i % len(self.requests)) if self.requests else "unknown"
        live = [seq for seq in self.h.live() if seq.request_id == rid]
        aborted = self.h.s.abort(rid)
        assert set(aborted) == set(live) and len(aborted) == len(live)
        assert all(seq.finish_reason == "abort" and not seq.table.block_ids for seq in aborted)
        assert not any(seq.request_id == rid for seq in self.h.live())
        self.broken = False

    @invariant()
    def consistent(self) -> None:
        self._guard()
        self.check()
        self.broken = False

    def check(self) -> None:
        h = self.h
        h.assert_no_leaks()
        waiting, running = list(h.s.waiting), h.s.running
        assert len(set(waiting + running)) == len(waiting) + len(running)
        for seq in waiting:
            assert seq.status is SeqStatus.WAITING
            assert not seq.table.block_ids and seq.num_computed == 0, "a waiting sequence holds blocks"
        for seq in running:
            assert seq.status is SeqStatus.RUNNING
            assert len(set(seq.table.block_ids)) == len(seq.table.block_ids)
            assert cdiv(seq.num_computed, h.bs) <= len(seq.table.block_ids) <= cdiv(len(seq.token_ids), h.bs)
            assert seq.num_cached % h.bs == 0 and seq.num_cached < len(seq.token_ids)
            assert h.intact(seq), "a computed position lost its latent"
            # full computed blocks are registered in the prefix cache (and nothing else)
            assert seq.table.num_hashed == (seq.num_computed // h.bs if h.bm.enable_prefix_caching else 0)
        for seq in waiting + running:
            assert seq.num_computed < len(seq.token_ids) < seq.max_len
            assert len(seq.token_ids) <= h.cfg.max_model_len
        for seq in h.seqs:
            if seq.finished:
                assert not seq.table.block_ids
                if seq.finish_reason == "length":
                    assert len(seq.token_ids) == seq.max_len

    def teardown(self) -> None:
        if not hasattr(self, "h") or self.broken:
            return
        h = self.h
        rng = random.Random(0)
        work = sum(seq.max_len for seq in h.live()) * 3 + 50  # no new requests: everyone finishes
        steps = 0
        while h.s.has_unfinished():
            assert steps < work, "the scheduler does not drain"
            h.step(token=lambda seq: rng.randrange(3))
            self.check()
            steps += 1
        h.assert_empty()
        for what in sorted(h.seen):
            event(what)


SchedulerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestSchedulerMachine = SchedulerMachine.TestCase


class ChunkedForkMachine(SchedulerMachine):
    CHUNKED_FORKS_ONLY = True


def test_state_machine_with_forks_under_chunked_prefill() -> None:
    """Regression: a prompt's final chunk scheduled in the running loop forks there, and the new
    siblings must neither get rows of their own nor sample twice (ForkScheduledTwice)."""
    run_state_machine_as_test(
        ChunkedForkMachine,
        settings=settings(max_examples=50, stateful_step_count=40, deadline=None, derandomize=True, database=None),
    )
