"""Deltas from backend threads into the router's event loop, coalesced.

Backends call a request's sink from their own threads. One `call_soon_threadsafe` per delta
would wake the loop once per token of every stream; instead sinks append to one shared list and
schedule a single drain while none is pending, so a burst of deltas (an engine step over 256
streams) costs one wakeup. A stream that fell behind reads everything queued for it at once and
merges consecutive deltas into one message (fewer writes to the client under load).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from moecluster.router.requests.backend import ChoiceDelta, Delta, Sink


class StreamBox:
    """What one request has received and not yet read."""

    def __init__(self) -> None:
        self.items: deque[Delta | BaseException] = deque()
        self.ready = asyncio.Event()

    async def take(self) -> list[Delta | BaseException]:
        await self.ready.wait()
        self.ready.clear()
        items = list(self.items)
        self.items.clear()
        return items


class LoopInbox:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[StreamBox, Delta | BaseException]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def sink_for(self, box: StreamBox) -> Sink:
        def sink(item: Delta | BaseException) -> None:
            with self._lock:
                self._pending.append((box, item))
                if self._scheduled:
                    return
                self._scheduled = True
            self.loop.call_soon_threadsafe(self._drain)

        return sink

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for box, item in pending:
            box.items.append(item)
            box.ready.set()


def merge(deltas: list[Delta]) -> Delta:
    """Consecutive deltas of one request as one: per sample, texts / tokens / logprobs appended,
    the last finish reason kept."""
    if len(deltas) == 1:
        return deltas[0]
    by_index: dict[int, ChoiceDelta] = {}
    for d in deltas:
        for c in d.choices:
            have = by_index.get(c.index)
            if have is None:
                by_index[c.index] = ChoiceDelta(c.index, c.text, list(c.token_ids),
                                                list(c.logprobs) if c.logprobs is not None else None,
                                                c.finish_reason, c.stop_reason)
                continue
            have.text += c.text
            have.token_ids += c.token_ids
            if c.logprobs is not None:
                have.logprobs = (have.logprobs or []) + c.logprobs
            if c.finish_reason is not None:
                have.finish_reason, have.stop_reason = c.finish_reason, c.stop_reason
    return Delta(deltas[-1].request_id, [by_index[i] for i in sorted(by_index)], deltas[-1].finished)
