"""A prefill engine and a decode engine joined by a KV transfer, behind the EngineCore interface.

Each step: the prefill engine steps (prompt chunks, first tokens; their deltas stream out at
once); every handoff it made is offered to the decode engine, which allocates blocks, receives
the latents and acknowledges, after which the prefill engine frees its copy. A handoff the
decode engine cannot take yet (no free blocks or slots) waits and is offered again next step,
while the prefill side keeps holding the blocks. A transfer that fails is retried up to
`max_retries` times; after that the sample is prefilled again on the decode engine from its
prompt and first token. Then the decode engine steps.

Inside the decode engine each handed-over sample is its own request `"{request_id}#{index}"`;
deltas are mapped back to the client's request id and sample index here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moecluster.workers.engine.engine_core import EngineCore, EngineStats
from moecluster.workers.engine.outputs import CompletionOutput, RequestOutput
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.transfer.handoff import KVHandoff
from moecluster.workers.transfer.kv_transfer import TransferError


@dataclass
class _Open:
    prompt: str | None
    prompt_ids: list[int]
    n: int
    done: set[int] = field(default_factory=set)


class DisaggregatedCore:
    def __init__(self, prefill: EngineCore, decode: EngineCore, max_retries: int = 2) -> None:
        if prefill.role != "prefill" or decode.role != "decode":
            raise ValueError(f"need a prefill and a decode engine, got {prefill.role!r} and {decode.role!r}")
        self.prefill, self.decode, self.max_retries = prefill, decode, max_retries
        self.pending: deque[KVHandoff] = deque()
        self.retries: dict[tuple[str, int], int] = {}
        self.open: dict[str, _Open] = {}
        self.num_refills = 0

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        self.decode.check(prompt_ids, params)
        return self.prefill.check(prompt_ids, params)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None) -> None:
        if request_id in self.open:
            raise ValueError(f"request id {request_id!r} is already running")
        self.decode.check(prompt_ids, params)
        self.prefill.add_request(request_id, prompt_ids, params, prompt)
        self.open[request_id] = _Open(prompt, list(prompt_ids), params.n)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.open.pop(request_id, None)
        if req is None:
            return None
        self.prefill.abort(request_id)  # frees its queued, running and staged-for-transfer blocks
        self.pending = deque(h for h in self.pending if h.request_id != request_id)
        out = RequestOutput(request_id, req.prompt, req.prompt_ids, finished=True)
        for index in range(req.n):
            self.decode.abort(f"{request_id}#{index}")
            if index not in req.done:
                out.outputs.append(CompletionOutput(index, "", [], finish_reason="abort"))
        return out

    def has_unfinished(self) -> bool:
        return bool(self.pending) or self.prefill.has_unfinished() or self.decode.has_unfinished()

    def step(self) -> list[RequestOutput]:
        outputs = [self._client(o) for o in self.prefill.step()]
        self.pending.extend(self.prefill.take_handoffs())
        self._deliver_handoffs()
        outputs += [self._from_decode(o) for o in self.decode.step()]
        return [o for o in outputs if o is not None]

    def _deliver_handoffs(self) -> None:
        waiting: deque[KVHandoff] = deque()
        while self.pending:
            h = self.pending.popleft()
            inner_id = f"{h.request_id}#{h.sample_index}"
            key = (h.request_id, h.sample_index)
            try:
                taken = self.decode.add_prefilled(h, inner_id)
            except TransferError:
                self.retries[key] = self.retries.get(key, 0) + 1
                if self.retries[key] <= self.max_retries:
                    waiting.append(h)
                    continue
                self._refill(h, inner_id)
                taken = True
            if taken:
                self.retries.pop(key, None)
                self.prefill.ack(h.request_id, h.sample_index)
            else:
                waiting.append(h)
        self.pending = waiting

    def _refill(self, h: KVHandoff, inner_id: str) -> None:
        """Give up on the transfer: the decode engine recomputes prompt + first token itself."""
        self.num_refills += 1
        left = None if h.params.max_tokens is None else h.params.max_tokens - 1
        params = h.params.model_copy(update={"n": 1, "max_tokens": left, "seed": None})
        self.decode.add_request(inner_id, [*h.prompt_ids, h.first_token], params, h.prompt)

    def _from_decode(self, out: RequestOutput) -> RequestOutput | None:
        request_id, _, index = out.request_id.rpartition("#")
        for o in out.outputs:
            o.index = int(index)
        out.request_id = request_id
        return self._client(out)

    def _client(self, out: RequestOutput) -> RequestOutput | None:
        """Rewrite `finished` to mean the client's request: all n samples have finished."""
        req = self.open.get(out.request_id)
        if req is None:
            return None
        out.prompt, out.prompt_token_ids = req.prompt, req.prompt_ids
        for o in out.outputs:
            if o.finish_reason is not None:
                req.done.add(o.index)
        out.finished = len(req.done) == req.n
        if out.finished:
            del self.open[out.request_id]
        return out

    def stats(self) -> EngineStats:
        p, d = self.prefill.stats(), self.decode.stats()
        return EngineStats(
            num_running=p.num_running + d.num_running,
            num_waiting=p.num_waiting + d.num_waiting + len(self.pending),
            kv_usage=d.kv_usage,
            kv_capacity_tokens=d.kv_capacity_tokens,
            num_blocks=d.num_blocks,
            num_free_blocks=d.num_free_blocks,
            prefix_hit_rate=p.prefix_hit_rate,
            num_preemptions=p.num_preemptions + d.num_preemptions,
            num_steps=p.num_steps + d.num_steps,
        )

    @property
    def runner(self):  # noqa: ANN201 - the decode side's runner (model, vocab) for callers that ask
        return self.decode.runner
