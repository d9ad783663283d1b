"""The per-replica engine: requests in, one scheduled forward per step, streamed deltas out.

Batch flow of `step()`: the scheduler picks this step's token chunks (decodes, prompt chunks,
new admissions) → the model runner launches them in one forward, performs fork block copies and
samples every sequence whose tokens are now all computed → the scheduler accounts the computed
tokens (`advance`) and each sampling sequence gets a placeholder token → once the step's inputs
are known on the host, the blocks they filled enter the prefix cache (`commit`) → when the
samples are read, they replace the placeholders, their text is produced incrementally and the
stop conditions checked → finished sequences free their blocks. Every request that progressed
gets one `RequestOutput` holding only what is new (a delta).

Asynchronous scheduling (`execute`): a decode step replayed from a CUDA graph is read only after
the next step was scheduled and launched, its sampled tokens becoming that step's inputs on the
device. A sequence that stops in the step in flight costs one wasted row in the next; a request
aborted meanwhile loses the token of the step in flight (the synchronous engine would have
streamed it before the abort).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import torch

from moecluster.text.detokenizer import Decoder
from moecluster.workers.engine.step_timer import StepTimer
from moecluster.workers.engine.block_manager import BlockManager
from moecluster.workers.engine.model_runner import ModelRunner
from moecluster.workers.engine.output_processor import SeqOutputState
from moecluster.workers.engine.outputs import CompletionOutput, Logprob, RequestOutput
from moecluster.workers.engine.request_limits import RequestError, RequestLimits
from moecluster.workers.engine.cuda_graphs import PrevTokens
from moecluster.workers.engine.sampler import HostSamples, SamplerOutput, to_host
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.engine.scheduler import Scheduler, SchedulerOutput
from moecluster.workers.engine.sequence import Sequence
from moecluster.workers.transfer.handoff import KVHandoff
from moecluster.workers.transfer.kv_transfer import KVTicket, KVTransfer

Role = Literal["both", "prefill", "decode"]
PLACEHOLDER = -1  # a sampled token id still on the device (asynchronous scheduling)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of cache blocks referenced
    kv_capacity_tokens: int
    num_blocks: int
    num_free_blocks: int  # unreferenced, cached ones included
    prefix_hit_rate: float  # prompt tokens found in the prefix cache / prompt tokens looked up
    num_preemptions: int
    num_steps: int


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    states: dict[int, SeqOutputState]  # sample index -> output state
    finished: set[int]


@dataclass
class _Launched:
    """A step queued on the device whose samples the host has not read yet."""

    sched: SchedulerOutput
    sampled: SamplerOutput  # on the device: the next step may take its input tokens from here
    host: HostSamples  # the same, on their way to the host
    computed: list[tuple[Sequence, int]]  # for the scheduler's commit once the inputs are known
    slots: list[int]  # per sampling sequence: the index of its placeholder in token_ids


class EngineCore:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        decoder: Decoder,
        eos_token_ids: Collection[int],
        role: Role = "both",
        transfer: KVTransfer | None = None,
        async_scheduling: bool = True,
    ) -> None:
        if role == "prefill" and transfer is None:
            raise ValueError("a prefill engine needs a KV transfer to hand its requests to a decode engine")
        self.runner, self.scheduler, self.decoder = runner, scheduler, decoder
        self.role, self.transfer = role, transfer
        self.handoffs: list[KVHandoff] = []  # made this step, for the caller to deliver
        self.transferring: dict[tuple[str, int], tuple[Sequence, KVTicket]] = {}  # awaiting the decode ack
        self.blocks: BlockManager = scheduler.blocks
        self.eos = frozenset(eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self._arrivals = itertools.count()
        self.num_preemptions = self.num_steps = 0
        self.timer = StepTimer()
        self.async_scheduling = async_scheduling
        self._pending: _Launched | None = None  # launched, samples not read (asynchronous scheduling)

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        max_len = self.check(prompt_ids, params)
        seq = Sequence(request_id, 0, list(prompt_ids), len(prompt_ids), params, max_len, next(self._arrivals))
        self.requests[request_id] = _Request(
            request_id, prompt, list(prompt_ids), params, {0: SeqOutputState(seq, self.decoder, self.eos)}, set()
        )
        self.scheduler.add(seq)

    @property
    def limits(self) -> RequestLimits:
        cfg = self.scheduler.cfg
        return RequestLimits(cfg.max_model_len, self.runner.vocab_size, self.blocks.capacity_tokens, cfg.max_num_seqs)

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Validate a request before it costs anything; returns its sequences' length budget."""
        return self.limits.check(prompt_ids, params)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; its final (empty) delta, if it existed."""
        for key in [k for k in self.transferring if k[0] == request_id]:
            self.ack(*key)  # staged for a decode engine that will not take it now
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        out = RequestOutput(request_id, req.prompt, req.prompt_ids, finished=True)
        for seq in self.scheduler.abort(request_id):
            out.outputs.append(CompletionOutput(seq.sample_index, "", [], finish_reason="abort"))
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._pending is not None

    def step(self, always_forward: bool = False) -> list[RequestOutput]:
        """One scheduled forward. With always_forward (an expert-parallel rank), a step with nothing
        scheduled still runs the model on an empty batch so the group's collectives complete.
        Under asynchronous scheduling a decode step's outputs come with the next call's."""
        return self.execute(self.schedule(), always_forward)

    def schedule(self) -> SchedulerOutput:
        """The first half of a step: what this step computes (split out so an EP group can agree
        on its token counts before the forward). Under asynchronous scheduling this runs while
        the step launched last is in flight: a decode of one of its sequences reads a placeholder
        (`execute` takes it on the device, or reads that step first when this one runs eagerly).
        Every schedule() must be followed by execute() or flush(): a sequence preempted here keeps
        its placeholder until then, and a step that preempts admits nothing, so no admission
        hashes a placeholder."""
        sched = self.scheduler.schedule()
        self.num_preemptions += len(sched.preempted)
        return sched

    def execute(
        self, sched: SchedulerOutput, always_forward: bool = False, graph_size: int | None = None
    ) -> list[RequestOutput]:
        """The second half: the forward, sampling and outputs of a scheduled step (graph_size: the
        decode graph an expert-parallel group agreed to replay).

        With `async_scheduling`, a step replayed from a decode graph is only launched here, its
        inputs taken on the device from the step before it; its samples are read and its outputs
        returned by the next call (or `flush`), after that next step is launched: the host's work
        for one step runs while the device computes the next. An eager step reads the step in
        flight first (it builds its inputs on the host) and leaves out the sequences that stopped."""
        outs: list[RequestOutput] = []
        if sched.empty and not always_forward:
            return self.flush()
        replay = self.runner.replays(sched, graph_size)
        if self._pending is not None and not replay:
            outs += self.flush()
            sched = _without_finished(sched)
        pending, self._pending = self._pending, None
        launched = self._launch(sched, graph_size, pending)
        if pending is not None:
            outs += self._finish(pending)
        self.scheduler.commit(launched.computed)  # its inputs are all on the host now
        if self.async_scheduling and replay:
            self._pending = launched
        else:
            outs += self._finish(launched)
        return outs

    def flush(self) -> list[RequestOutput]:
        """Read the step launched last, if any: the outputs not returned yet."""
        pending, self._pending = self._pending, None
        return self._finish(pending) if pending is not None else []

    def _launch(self, sched: SchedulerOutput, graph_size: int | None, pending: _Launched | None) -> _Launched:
        """Queue the step's forward and sampling on the device and account it as computed; each
        sampling sequence holds a PLACEHOLDER token until its sample is read (`_finish`)."""
        t0 = time.perf_counter()
        prev = None
        if pending is not None:  # inputs sampled by the pending step are still on the device
            row_of = {id(seq): row for row, (seq, _) in enumerate(pending.sched.samplers)}
            rows = [row_of[id(s.seq)] if s.seq.token_ids[s.seq.num_computed] == PLACEHOLDER else -1
                    for s in sched.scheduled]
            if any(r >= 0 for r in rows):
                prev = PrevTokens(pending.sampled.token_ids, rows)
        sampled = self.runner.execute(sched, graph_size, prev)
        host = to_host(sampled)
        computed = self.scheduler.advance(sched)
        slots = []
        for seq, _ in sched.samplers:
            slots.append(len(seq.token_ids))
            seq.token_ids.append(PLACEHOLDER)
        self.timer.record("launch", time.perf_counter() - t0)
        return _Launched(sched, sampled, host, computed, slots)

    def _finish(self, step: _Launched) -> list[RequestOutput]:
        """Wait for a launched step's samples, put them in place of their placeholders and produce
        its outputs."""
        t0 = time.perf_counter()
        sampled = step.host.wait()
        tokens = sampled.token_ids.tolist()
        t1 = time.perf_counter()
        for (seq, _), slot, token in zip(step.sched.samplers, step.slots, tokens):
            seq.token_ids[slot] = token
        self.num_steps += 1
        outs = self._process(step, sampled, tokens)
        self.timer.record("gpu_wait", t1 - t0)
        self.timer.record("outputs", time.perf_counter() - t1)
        return outs

    def _process(self, step: _Launched, sampled: SamplerOutput, tokens: list[int]) -> list[RequestOutput]:
        chosen, ranks = sampled.logprobs.tolist(), sampled.ranks.tolist()
        top_ids = sampled.top_ids.tolist() if sampled.top_ids is not None else None
        top_lp = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
        outputs: dict[str, RequestOutput] = {}
        for row, (seq, _) in enumerate(step.sched.samplers):
            if seq.finished:  # stopped or aborted after this step was launched: its row is void
                continue
            req = self.requests[seq.request_id]
            state = req.states.get(seq.sample_index)
            if state is None:  # a fork created this step
                state = req.states[seq.sample_index] = SeqOutputState(seq, self.decoder, self.eos)
            token = tokens[row]
            text, reason, stop_reason = state.on_token(token, step.slots[row] + 1)
            delta = CompletionOutput(seq.sample_index, text, [token], cumulative_logprob=None)
            k = seq.params.logprobs
            if k is not None:
                entry = {token: Logprob(chosen[row], ranks[row])}
                if k and top_ids is not None and top_lp is not None:
                    for rank, (tid, lp) in enumerate(zip(top_ids[row][:k], top_lp[row][:k]), start=1):
                        entry.setdefault(tid, Logprob(lp, rank))
                delta.logprobs = [entry]
            delta.cumulative_logprob = chosen[row]
            if reason is not None:
                self.scheduler.finish(seq, reason, stop_reason)
                delta.finish_reason, delta.stop_reason = reason, stop_reason
                req.finished.add(seq.sample_index)
            elif self.role == "prefill":
                self._hand_off(req, seq)
                req.finished.add(seq.sample_index)  # done here; the decode engine continues it
            out = outputs.get(seq.request_id)
            if out is None:
                out = outputs[seq.request_id] = RequestOutput(seq.request_id, req.prompt, req.prompt_ids)
            out.outputs.append(delta)
        for request_id, out in outputs.items():
            req = self.requests[request_id]
            if len(req.finished) == req.params.n:
                out.finished = True
                del self.requests[request_id]
        return list(outputs.values())

    # ---- prefill / decode split -----------------------------------------------------------------
    def _hand_off(self, req: _Request, seq: Sequence) -> None:
        """Stage a freshly prefilled sequence's prompt blocks for transfer; keep them until acked."""
        assert self.transfer is not None
        self.scheduler.detach(seq)
        blocks = seq.table.block_ids[: -(-seq.prompt_len // self.blocks.block_size)]
        ticket = self.transfer.send(self.runner.kv_caches, blocks)
        self.transferring[(seq.request_id, seq.sample_index)] = (seq, ticket)
        gen = seq.generator.get_state().numpy().tobytes() if seq.generator is not None else None
        self.handoffs.append(KVHandoff(
            seq.request_id, seq.sample_index, req.prompt, req.prompt_ids, seq.token_ids[-1], seq.params,
            seq.prompt_len, seq.max_len, ticket, gen,
        ))

    def take_queue_times(self) -> list[float]:
        """Drain the queue times recorded since the last call (safe from another thread)."""
        out, times = [], self.scheduler.queue_times  # recorded where the scheduler admits a sequence
        while times:
            out.append(times.popleft())
        return out

    def take_handoffs(self) -> list[KVHandoff]:
        out, self.handoffs = self.handoffs, []
        return out

    def ack(self, request_id: str, sample_index: int) -> None:
        """The decode side holds the blocks now (or gave up on them): free ours."""
        entry = self.transferring.pop((request_id, sample_index), None)
        if entry is None:
            return
        seq, ticket = entry
        assert self.transfer is not None
        self.transfer.release(ticket)
        self.blocks.free(seq.table)

    def add_prefilled(self, h: KVHandoff, request_id: str) -> bool:
        """Admit a handed-over sample as `request_id` (one sample): receive its blocks, then decode.
        False when blocks or running slots are short right now (retry later); raises
        TransferError (nothing kept) when the transfer itself fails."""
        if self.transfer is None:
            raise ValueError("this engine has no KV transfer to receive with")
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        params = h.params.model_copy(update={"n": 1})
        seq = Sequence(request_id, 0, [*h.prompt_ids, h.first_token], len(h.prompt_ids), params, h.max_len,
                       next(self._arrivals))
        if len(self.scheduler.running) >= self.scheduler.cfg.max_num_seqs or not self.blocks.can_allocate(
            self.blocks.blocks_needed(seq.table, len(seq.token_ids))
        ):
            return False
        self.blocks.grow(seq.table, len(seq.token_ids))
        try:
            n_blocks = -(-h.num_tokens // self.blocks.block_size)
            self.transfer.receive(h.ticket, self.runner.kv_caches, seq.table.block_ids[:n_blocks])
        except BaseException:
            self.blocks.free(seq.table)
            raise
        seq.num_computed = h.num_tokens
        self.blocks.commit(seq.table, seq.token_ids, seq.num_computed)
        if h.generator_state is not None:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.set_state(torch.frombuffer(bytearray(h.generator_state), dtype=torch.uint8))
        state = SeqOutputState(seq, self.decoder, self.eos)
        state.on_token(h.first_token, len(seq.token_ids))  # already streamed by the prefill side; primes text and stops
        self.requests[request_id] = _Request(request_id, h.prompt, h.prompt_ids, params, {0: state}, set())
        self.scheduler.add_running(seq)
        return True

    def stats(self) -> EngineStats:
        s = self.blocks.stats()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=s.usage,
            kv_capacity_tokens=self.blocks.capacity_tokens,
            num_blocks=s.num_blocks,
            num_free_blocks=s.num_free_blocks,
            prefix_hit_rate=s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
        )


def _without_finished(sched: SchedulerOutput) -> SchedulerOutput:
    """A step scheduled while the one before it was in flight, less the sequences that stopped
    when that one was read (their blocks are freed: an eager forward cannot address them); the
    rows of the rest renumbered, forks sharing their parent's row kept."""
    if not any(s.seq.finished for s in sched.scheduled):
        return sched
    keep = [(row, s) for row, s in enumerate(sched.scheduled) if not s.seq.finished]
    new_row = {old: new for new, (old, _) in enumerate(keep)}
    samplers = [(seq, new_row[row]) for seq, row in sched.samplers if row in new_row and not seq.finished]
    return SchedulerOutput([s for _, s in keep], samplers, sched.block_copies, sched.preempted, sched.forked)
