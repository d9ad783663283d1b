"""A prefill engine and a decode engine joined by a KV transfer, behind the EngineCore interface.

Each step: the prefill engine steps (prompt chunks, first tokens; their deltas stream out at
once); every handoff it made joins a `HandoffQueue` for the decode engine (wait while blocks are
short, retry a failed transfer, then re-prefill), and each handoff the decode engine took is
acknowledged so the prefill engine frees its copy. Then the decode engine steps.

Inside the decode engine each handed-over sample is its own request `"{request_id}#{index}"`;
deltas are mapped back to the client's request id and sample index here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moecluster.workers.engine.engine_core import EngineCore, EngineStats
from moecluster.workers.engine.handoff_queue import HandoffQueue
from moecluster.workers.engine.outputs import CompletionOutput, RequestOutput
from moecluster.workers.engine.sampling_params import SamplingParams


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
        self.pending = HandoffQueue(decode, max_retries)
        self.open: dict[str, _Open] = {}

    @property
    def num_refills(self) -> int:
        return self.pending.num_refills

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
        self.pending.drop(lambda h, _: h.request_id == request_id)
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
        for h in self.prefill.take_handoffs():
            self.pending.offer(h, f"{h.request_id}#{h.sample_index}")
        for taken in self.pending.deliver():
            self.prefill.ack(taken.handoff.request_id, taken.handoff.sample_index)
        outputs += [self._from_decode(o) for o in self.decode.step()]
        return [o for o in outputs if o is not None]

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
