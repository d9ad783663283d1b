"""Continuous batching over the paged latent cache. CPU bookkeeping only, no torch.

Each step gets a token budget. Running sequences go first, in admission order: a decode takes
one token, an unfinished prompt takes its next chunk. Then waiting sequences are admitted in
arrival order (FCFS), after a prefix-cache lookup, while the budget, the running-sequence limit
and free blocks allow. When a running sequence needs a block and none is free, the most recently
admitted sequence is preempted: its blocks are freed and it goes back to the head of the queue,
to be recomputed from its prompt and the tokens it already generated (its full blocks usually
come back as prefix-cache hits). Nothing is admitted in a step that preempted.

A request with n > 1 samples runs one sequence through the prompt; in the step that completes
the prompt it forks into n sequences that share the prompt's full blocks (the partial last block
is copied after the step) and sample their first tokens from the same logits.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from moecluster.workers.engine.block_manager import BlockManager, BlockTable, OutOfBlocks
from moecluster.workers.engine.sequence import Sequence, SeqStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must be at "
                f"least max_model_len ({self.max_model_len}) so that any prompt fits one step"
            )


class ScheduledSeq(NamedTuple):  # a tuple: hundreds are made per step
    seq: Sequence
    num_tokens: int  # new tokens computed this step
    sample: bool  # this step completes the sequence's tokens, so it samples the next one


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    # (sequence that samples, the scheduled row whose logits it samples from); forks share a row
    samplers: list[tuple[Sequence, int]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) after the forward
    preempted: list[Sequence] = field(default_factory=list)
    forked: list[Sequence] = field(default_factory=list)  # siblings created this step (they sample, not compute)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager) -> None:
        self.cfg, self.blocks = cfg, blocks
        self.waiting: deque[Sequence] = deque()
        # seconds each sequence waited before it first ran; the newest ones, until the engine drains them
        self.queue_times: deque[float] = deque(maxlen=4096)
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose cache blocks were filled elsewhere (a KV handoff): it decodes next step."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self._started(seq)

    def _started(self, seq: Sequence) -> None:
        """First time a sequence runs (not again after a preemption): its queue time."""
        if seq.queue_time is None:
            seq.queue_time = time.monotonic() - seq.queued_at
            self.queue_times.append(seq.queue_time)

    def detach(self, seq: Sequence) -> None:
        """Stop scheduling a running sequence but keep its blocks (they are being transferred)."""
        self.running.remove(seq)
        seq.status = SeqStatus.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            if n == 0:
                i += 1
                continue
            if not self._reserve(seq, n, out):
                break  # seq itself was preempted; everything after it already was
            self._schedule(seq, n, out)
            budget -= n
            i += 1
        while self.waiting and budget > 0 and not out.preempted:
            seq = self.waiting[0]
            if len(self.running) + len(out.forked) + self._slots(seq) > self.cfg.max_num_seqs:
                break
            n = self._admit_chunk(seq, budget)
            if n == 0:
                if not self.running and not out.scheduled:
                    raise OutOfBlocks(f"request {seq.request_id} does not fit the empty cache")
                break
            self.blocks.grow(seq.table, seq.num_computed + n)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self._started(seq)
            self._schedule(seq, n, out)
            budget -= n
        self.running += out.forked
        return out

    @staticmethod
    def _slots(seq: Sequence) -> int:
        """Running slots a sequence will take: a request that has not forked yet will take n."""
        return 1 if seq.forked else seq.params.n

    def _admit_chunk(self, seq: Sequence, budget: int) -> int:
        """For the head of the queue: take its prefix-cache hits and return its first chunk, or
        0 (nothing taken, nothing counted) when the budget or free blocks do not allow it yet."""
        bs = self.blocks.block_size
        if seq.table.block_ids:  # holds blocks already (a fork that could not be placed)
            cached, hits, idle = seq.num_computed, len(seq.table.block_ids), 0
        else:
            matched, _, idle = self.blocks.match_prefix(seq.token_ids)
            cached, hits = len(matched) * bs, len(matched)
        todo = len(seq.token_ids) - cached
        n = min(todo, budget) if self.cfg.enable_chunked_prefill else (todo if todo <= budget else 0)
        if n == 0 or not self.blocks.can_allocate(-(-(cached + n) // bs) - hits + idle):
            return 0
        if not seq.table.block_ids:
            seq.num_computed = seq.num_cached = self.blocks.allocate_prefix(seq.table, seq.token_ids)
        return n

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of seq to compute this step within budget (0: not this step). A sequence that
        holds max_len tokens computes nothing more: it stops once its last token is read (an
        asynchronous engine schedules before reading it)."""
        if len(seq.token_ids) >= seq.max_len:
            return 0
        todo = seq.num_uncomputed
        if self.cfg.enable_chunked_prefill:
            return min(todo, budget)
        return todo if todo <= budget else 0

    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Make room for n more tokens of a running seq, preempting from the back if needed."""
        if seq.num_computed + n <= len(seq.table.block_ids) * self.blocks.block_size:
            return True  # the common decode step: its last block still has room
        while not self.blocks.can_allocate(self.blocks.blocks_needed(seq.table, seq.num_computed + n)):
            victim = self.running[-1]
            self.preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.table, seq.num_computed + n)
        return True

    def _schedule(self, seq: Sequence, n: int, out: SchedulerOutput) -> None:
        row = len(out.scheduled)
        sample = seq.num_computed + n == len(seq.token_ids)
        out.scheduled.append(ScheduledSeq(seq, n, sample))
        if not sample:
            return
        out.samplers.append((seq, row))
        if seq.params.n > 1 and not seq.forked:
            seq.forked = True
            for sibling in self._fork(seq, out):
                out.samplers.append((sibling, row))

    def _fork(self, seq: Sequence, out: SchedulerOutput) -> list[Sequence]:
        """The other n - 1 samples of seq's request, sharing its prompt blocks."""
        siblings = []
        for index in range(1, seq.params.n):
            sibling = Sequence(
                seq.request_id, index, list(seq.token_ids), seq.prompt_len, seq.params, seq.max_len,
                seq.arrival, generator=None, forked=True,
            )
            try:
                sibling.table, copies = self.blocks.fork(seq.table, len(seq.token_ids))
            except OutOfBlocks:
                self.waiting.appendleft(sibling)  # recomputed later, mostly from the prefix cache
                continue
            out.block_copies += copies
            sibling.status = SeqStatus.RUNNING
            out.forked.append(sibling)  # joins `running` after this step's scheduling loops
            siblings.append(sibling)
        return siblings

    def update(self, out: SchedulerOutput) -> None:
        """After the forward: account computed tokens and register newly full blocks."""
        self.commit(self.advance(out))

    def advance(self, out: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """Account the step's computed tokens (needs no sampled token, so an asynchronous engine
        does it at launch). Returns (sequence, tokens computed) for `commit`."""
        computed = []
        for seq, n, _ in out.scheduled:
            seq.num_computed += n
            computed.append((seq, seq.num_computed))
        for seq, _ in out.samplers:
            if seq.num_computed < len(seq.token_ids):  # a fork: its prompt was computed by its parent's row
                seq.num_computed = len(seq.token_ids)
                computed.append((seq, seq.num_computed))
        return computed

    def commit(self, computed: list[tuple[Sequence, int]]) -> None:
        """Register the blocks filled up to each count in the prefix cache. Needs every token
        below the count on the host: an asynchronous engine calls it once the step's inputs are
        known, and skips sequences that stopped, were aborted or preempted meanwhile (their tables
        are gone)."""
        bs = self.blocks.block_size
        for seq, upto in computed:
            if seq.status is SeqStatus.RUNNING and upto // bs > seq.table.num_hashed:  # a block filled up
                self.blocks.commit(seq.table, seq.token_ids, upto)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Stop a sequence (done, or aborted while waiting or running) and free its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.table)
        seq.status, seq.finish_reason, seq.stop_reason = SeqStatus.FINISHED, reason, stop_reason

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every waiting or running sequence of a request; returns them."""
        seqs = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.table)
        seq.table = BlockTable([])
        seq.num_computed = seq.num_cached = 0
