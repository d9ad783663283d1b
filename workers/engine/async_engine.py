"""The engine as a service: a background thread steps an EngineCore; callers submit and stream.

Requests are validated in the caller's thread (a bad request raises there and costs nothing),
then handed to the engine thread, which applies submissions and aborts at step boundaries, steps
while anything is unfinished and sleeps on its command queue otherwise. Each request's deltas go
to the sink it was submitted with: `generate` gives an asyncio stream (the router's and cluster's
interface; a consumer that stops iterating aborts its request), `submit` takes any callable (the
offline `LLM` collects with a plain queue). If a step raises, every open request receives the
exception and the engine refuses new work.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from moecluster.workers.engine.engine_core import EngineCore, EngineStats
from moecluster.workers.engine.outputs import RequestOutput
from moecluster.workers.engine.sampling_params import SamplingParams

Sink = Callable[[RequestOutput | BaseException], None]


class EngineDead(RuntimeError):
    pass


@dataclass(frozen=True)
class _Submit:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None
    sink: Sink


@dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._commands: queue.SimpleQueue[_Submit | _Abort | None] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._error: BaseException | None = None
        self._stats = core.stats()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="moecluster-engine", daemon=True)
        self._thread.start()

    # ---- caller side -------------------------------------------------------------------------
    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink, prompt: str | None = None
    ) -> None:
        """Queue a request; its deltas (or an exception) are passed to sink from the engine thread."""
        if self._error is not None or self._stopping:
            raise EngineDead(f"the engine is not running ({self._error!r})")
        self.core.check(prompt_ids, params)
        self._commands.put(_Submit(request_id, list(prompt_ids), params, prompt, sink))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Validate a request without submitting it (raises RequestError)."""
        return self.core.check(prompt_ids, params)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas; the last one has `finished` set."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.submit(request_id, prompt_ids, params, lambda x: loop.call_soon_threadsafe(deltas.put_nowait, x), prompt)
        finished = failed = False
        try:
            while not finished:
                item = await deltas.get()
                if isinstance(item, BaseException):
                    failed = True  # refused or the engine died: nothing of ours is left to abort
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished and not failed:
                self.abort(request_id)

    def stats(self) -> EngineStats:
        """As of the last step boundary."""
        return self._stats

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(None)
        self._thread.join(timeout)

    # ---- engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                block = not self.core.has_unfinished()
                if not self._drain(block):
                    return
                if self.core.has_unfinished():
                    for out in self.core.step():
                        self._deliver(out)
                self._stats = self.core.stats()
        except BaseException as e:  # noqa: BLE001 - every open request must hear about it
            self._error = e
            for sink in self._sinks.values():
                _notify(sink, e)
            self._sinks.clear()

    def _drain(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if block); False when shutting down."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd is None:
                return False
            if isinstance(cmd, _Abort):
                out = self.core.abort(cmd.request_id)
                sink = self._sinks.pop(cmd.request_id, None)
                if out is not None and sink is not None:
                    _notify(sink, out)
                continue
            try:
                self.core.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.prompt)
            except ValueError as e:  # e.g. a duplicate request id: that request fails, the engine goes on
                _notify(cmd.sink, e)
                continue
            self._sinks[cmd.request_id] = cmd.sink

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is None:
            return
        if out.finished:
            del self._sinks[out.request_id]
        if not _notify(sink, out):
            self.core.abort(out.request_id)  # nobody is listening any more
            self._sinks.pop(out.request_id, None)


def _notify(sink: Sink, item: RequestOutput | BaseException) -> bool:
    """Hand an item to a caller's sink; a sink whose consumer is gone (closed loop) must not stop
    the engine. Returns whether it was delivered."""
    try:
        sink(item)
    except Exception:  # noqa: BLE001
        return False
    return True
