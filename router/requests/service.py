"""What both front ends (gRPC and OpenAI HTTP) do with a request, protocol aside.

    call -> resolve model -> tokenize (text | token ids | chat template) -> admit (queue bound,
    length and field checks) -> place (policy over the entry pool's DP ranks, by the prompt's
    block-hash chain) -> backend.submit -> deltas (backend threads -> `inbox`, coalesced) -> the caller

A caller that stops iterating (client gone, cancelled, deadline passed) aborts the request, which
frees its blocks. Errors are typed so each protocol maps them to its own status:
`InvalidRequest` (names the field), `UnknownModel`, `Overloaded` (with a retry hint),
`DeadlineExceeded`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from moecluster.proto.block_hash import block_hashes
from moecluster.router.requests.backend import Backend, Delta, Overloaded
from moecluster.router.requests.inbox import LoopInbox, StreamBox, merge
from moecluster.router.requests.metrics import RouterMetrics
from moecluster.router.requests.placement import NoHealthyTarget, PlacementPolicy, PlacementRequest
from moecluster.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Texts longer than this (characters) have their tokens counted on a worker thread before `prepare`
# tokenizes them on the event loop: the Rust tokenizer holds the GIL in a single `encode` (seconds
# for a body of megabytes, with every stream of the router frozen meanwhile) but not in
# `encode_batch`, so one that cannot fit the context is refused without stalling the loop.
LONG_TEXT_CHARS = 1 << 16
# Its own threads: long texts queue behind each other, not in front of the default executor's
# work (the health endpoints' backend calls).
_COUNTING = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="moecluster-count")


class InvalidRequest(ValueError):
    """A request refused before it costs anything; `field` names the offending input."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownModel(LookupError):
    pass


class DeadlineExceeded(TimeoutError):
    pass


@dataclass
class GenerateCall:
    """One request as either protocol delivers it (exactly one of prompt, prompt_ids, messages)."""

    model: str | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    session_id: str | None = None
    timeout_s: float | None = None  # the client's deadline, from now


@dataclass
class Prepared:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    sampling: dict[str, Any]
    session_id: str | None


@dataclass
class RouterStats:
    """Counters the /metrics endpoint exports (monotonic, except `open`)."""

    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    finished: int = 0
    aborted: int = 0
    open: int = 0


class RequestService:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, policy: PlacementPolicy, max_queue: int = 1024) -> None:
        self.backend, self.tokenizer, self.policy, self.max_queue = backend, tokenizer, policy, max_queue
        self.stats = RouterStats()
        self.metrics = RouterMetrics(lambda: self.stats.open)
        self._inbox: LoopInbox | None = None
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

    @property
    def model_name(self) -> str:
        return self.backend.model.name

    def resolve_model(self, name: str | None) -> None:
        if name and name != self.backend.model.name:
            raise UnknownModel(f"model {name!r} is not served here; this deployment serves {self.backend.model.name!r}")

    async def prepare_async(self, call: GenerateCall) -> Prepared:
        """`prepare` for the event loop: a long text is first measured off the loop."""
        await self._refuse_overlong(call)
        return self.prepare(call)

    async def _refuse_overlong(self, call: GenerateCall) -> None:
        raw = getattr(getattr(self.tokenizer, "backend", None), "backend_tokenizer", None)  # the Rust one, if any
        if raw is None or not hasattr(raw, "encode_batch"):
            return
        if call.prompt is not None and call.messages is None and call.prompt_ids is None:
            if len(call.prompt) <= LONG_TEXT_CHARS:
                return
            self.resolve_model(call.model)
            text, extra = call.prompt, len(self.tokenizer.encode("", add_special_tokens=True))
        elif call.messages is not None and call.prompt is None and call.prompt_ids is None:
            size = sum(len(m["content"]) for m in call.messages if isinstance(m, dict) and isinstance(m.get("content"), str))
            if size <= LONG_TEXT_CHARS:
                return
            self.resolve_model(call.model)
            text, extra = self._render_chat(call), 0
        else:
            return
        count = await asyncio.get_running_loop().run_in_executor(
            _COUNTING, lambda: len(raw.encode_batch([text], add_special_tokens=False)[0].ids))
        limit = self.backend.model.max_model_len
        if count + extra >= limit:
            raise InvalidRequest(
                f"prompt of {count + extra} tokens does not fit the context length {limit} with room to generate", "prompt"
            )

    def prepare(self, call: GenerateCall) -> Prepared:
        """Everything that can refuse a request, before it costs anything."""
        self.resolve_model(call.model)
        given = [k for k in ("prompt", "prompt_ids", "messages") if getattr(call, k) is not None]
        if len(given) != 1:
            raise InvalidRequest(f"give exactly one of prompt, token ids or messages (got {given or 'none'})", "prompt")
        prompt = call.prompt
        if call.messages is not None:
            prompt = self._render_chat(call)
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif call.prompt is not None:
            if not call.prompt:
                raise InvalidRequest("the prompt is empty", "prompt")
            ids = self.tokenizer.encode(call.prompt)
        else:
            ids = list(call.prompt_ids or [])
            if len(ids) >= self.backend.model.max_model_len:  # before looking at each of a million ids
                raise InvalidRequest(f"prompt of {len(ids)} tokens does not fit the context length "
                                     f"{self.backend.model.max_model_len} with room to generate", "prompt")
            vocab = self.tokenizer.vocab_size
            bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(f"token id {bad!r} is outside the vocabulary [0, {vocab})", "prompt")
        if not ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        limit = self.backend.model.max_model_len
        if len(ids) >= limit:
            raise InvalidRequest(
                f"prompt of {len(ids)} tokens does not fit the context length {limit} with room to generate", "prompt"
            )
        max_tokens = call.sampling.get("max_tokens")
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0 and len(ids) + max_tokens > limit:
            raise InvalidRequest(
                f"prompt of {len(ids)} tokens plus max_tokens {max_tokens} exceeds the context length {limit}", "max_tokens"
            )
        if call.request_id is not None and (not call.request_id or len(call.request_id) > 256):
            raise InvalidRequest("request_id must be 1 to 256 characters", "request_id")
        if call.request_id is not None and ("#" in call.request_id or "@" in call.request_id):
            raise InvalidRequest("request_id must not contain '#' or '@' (they mark internal sample ids)", "request_id")
        request_id = call.request_id or f"req-{self._prefix}-{next(self._ids)}"
        return Prepared(request_id, prompt, ids, dict(call.sampling), call.session_id or None)

    def _render_chat(self, call: GenerateCall) -> str:
        messages = call.messages or []
        if not messages:
            raise InvalidRequest("messages is empty", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequest(f"messages[{i}] needs a string 'role'", f"messages[{i}].role")
        try:
            return self.tokenizer.render_chat(messages, add_generation_prompt=True, tools=call.tools, **call.template_kwargs)
        except ValueError as e:
            raise InvalidRequest(str(e), "messages") from None
        except Exception as e:  # noqa: BLE001 - a template error is the request's problem, not the server's
            raise InvalidRequest(f"the chat template could not render these messages: {e}", "messages") from None

    async def stream(self, call: GenerateCall) -> AsyncIterator[Delta]:
        """Deltas of one request until it finishes; leaving early aborts it."""
        p = await self.prepare_async(call)
        async for delta in self.stream_prepared(p, call.timeout_s):
            yield delta

    async def stream_prepared(self, p: Prepared, timeout_s: float | None = None, protocol: str = "grpc") -> AsyncIterator[Delta]:
        start = time.perf_counter()
        if self.stats.open >= self.max_queue:
            self._reject("overloaded", protocol)
            raise Overloaded(f"{self.stats.open} requests are in flight (max_queue {self.max_queue}); retry later", 1.0)
        if self._inbox is None:
            self._inbox = LoopInbox(asyncio.get_running_loop())
        box = StreamBox()
        sink = self._inbox.sink_for(box)

        hashes = tuple(block_hashes(p.prompt_ids, self.backend.model.block_size))
        try:
            target = self.policy.choose(PlacementRequest(p.request_id, hashes, p.session_id), self.backend.rank_views())
        except NoHealthyTarget:
            target = None  # every replica is being rebuilt: the backend queues it until one is back
        try:
            self.backend.submit(p.request_id, p.prompt_ids, p.sampling, sink, prompt=p.prompt, target=target)
        except ValueError as e:
            self._reject("invalid", protocol)
            raise InvalidRequest(str(e), _field_of(str(e))) from None
        except Overloaded:
            self._reject("overloaded", protocol)
            raise
        if target is not None:
            self.policy.record(target, hashes)
        self.stats.accepted += 1
        self.stats.open += 1
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        done, first, outcome = False, True, "error"
        outputs: list[int] = []
        try:
            while not done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DeadlineExceeded(f"request {p.request_id} passed its deadline")
                try:
                    items = await asyncio.wait_for(box.take(), left)
                except TimeoutError:
                    raise DeadlineExceeded(f"request {p.request_id} passed its deadline") from None
                error = next((i for i in items if isinstance(i, BaseException)), None)
                deltas = [i for i in items if not isinstance(i, BaseException)]
                if error is not None and not deltas:
                    done = True
                    if isinstance(error, ValueError):
                        raise InvalidRequest(str(error), _field_of(str(error)))
                    raise error
                if error is not None:
                    box.items.appendleft(error)  # after these deltas
                    box.ready.set()
                item = merge(deltas)
                if len(item.choices) == 1 and item.choices[0].index == 0:
                    outputs += item.choices[0].token_ids
                done = item.finished
                if first and any(c.token_ids for c in item.choices):
                    first = False
                    self.metrics.ttft.labels(protocol).observe(time.perf_counter() - start)
                yield item
            self.stats.finished += 1
            outcome = "finished"
            if target is not None and outputs:  # the conversation so far now sits in that cache
                self.policy.record(target, block_hashes(p.prompt_ids + outputs, self.backend.model.block_size))
        except DeadlineExceeded:
            outcome = "deadline"
            raise
        finally:
            self.stats.open -= 1
            if not done:
                self.stats.aborted += 1
                outcome = "aborted" if outcome == "error" else outcome
                self.backend.abort(p.request_id)
            self.metrics.requests.labels(protocol, outcome).inc()
            self.metrics.latency.labels(protocol).observe(time.perf_counter() - start)

    def abort(self, request_id: str) -> bool:
        return self.backend.abort(request_id)

    def _reject(self, reason: str, protocol: str) -> None:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        self.metrics.requests.labels(protocol, f"rejected_{reason}").inc()


def _field_of(message: str) -> str | None:
    """The sampling field a backend's validation message names, when it names one."""
    head = message.split(":", 1)[0].strip()
    parts = head.split(".")  # pydantic names a list item as "stop.0": the field is "stop"
    if parts[0].isidentifier() and all(p.isidentifier() or p.isdigit() for p in parts[1:]):
        return parts[0]
    return None
