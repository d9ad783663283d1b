"""Driver-side bookkeeping for a group of ranks: which rank serves each open request, where its
deltas go, and what the ranks' events mean. Shared by the local-process group and the Ray replica."""

from __future__ import annotations

import threading
from typing import Any, Callable

from moecluster.workers.engine.async_engine import EngineDead, Sink, _notify
from moecluster.workers.engine.eplb_apply import RebalanceReport
from moecluster.workers.engine.outputs import from_wire


class RankStreams:
    def __init__(self, world: int, name: str, listener: Callable[[str, int, Any], None] | None = None) -> None:
        """`listener(kind, rank, payload)` hears the prefill / decode split's events: each
        KVHandoff of a "handoff" event (after its step's outputs reached their sinks) and each
        (inner_id, outcome) of a "taken" event."""
        self.world, self.name, self.listener = world, name, listener
        self._sinks: dict[str, Sink] = {}
        self._owner: dict[str, int] = {}
        self._lock = threading.Lock()
        # Held while one event is applied and while fail() marks the group failed, so a failure
        # never lands inside an event: a handoff's first token and the handoff itself either both
        # reach the deployment before the failure is announced, or neither does.
        self._events = threading.RLock()
        self.error: str | None = None
        self.eplb_reports: list[tuple[int, RebalanceReport]] = []  # (rank, report), as they arrive

    def open(self, request_id: str, sink: Sink, rank: int | None = None) -> int:
        """Register a request; returns the rank to serve it: `rank` when given, else the one with
        the fewest open requests."""
        with self._lock:
            if self.error is not None:  # under the lock: fail() cannot slip in between
                raise EngineDead(f"{self.name} failed: {self.error}")
            if request_id in self._sinks:
                raise ValueError(f"request id {request_id!r} is already running")
            if rank is None or not 0 <= rank < self.world:
                load = self._load()
                rank = min(range(self.world), key=lambda r: (load[r], r))
            self._sinks[request_id], self._owner[request_id] = sink, rank
        return rank

    def _load(self) -> list[int]:
        load = [0] * self.world
        for owner in self._owner.values():
            load[owner] += 1
        return load

    def load(self) -> list[int]:
        """Open requests per rank."""
        with self._lock:
            return self._load()

    def forget(self, request_id: str) -> None:
        """Stop delivering a request (its client is gone; an abort is on its way to the rank), so
        the id can be used again at once."""
        with self._lock:
            self._sinks.pop(request_id, None)
            self._owner.pop(request_id, None)

    def owner(self, request_id: str) -> int | None:
        return self._owner.get(request_id)

    def open_requests(self) -> int:
        return len(self._sinks)

    def handle(self, event: tuple) -> None:
        """Apply one event from a rank's outbox. A `fail()` on another thread waits for it, and
        events applied after a failure are dropped: a handoff's first token and the handoff reach
        the deployment together or not at all (unless the listener itself raises)."""
        with self._events:
            self._handle(event)

    def _handle(self, event: tuple) -> None:
        kind, who, payload = event
        if self.error is not None:
            # The group failed: every stream it had was told so and fails over. What its other
            # ranks still report is stale; a handoff in particular would be continued on a decode
            # replica while the request also resumes elsewhere, and its first token found no stream.
            return
        if kind == "out":
            for out in from_wire(payload):
                self._deliver(out.request_id, out, out.finished)
        elif kind == "handoff":
            outs, handoffs = payload
            for out in from_wire(outs):
                self._deliver(out.request_id, out, out.finished)
            for h in handoffs:
                self._listen("handoff", who, h)
        elif kind == "taken":
            for item in payload:
                self._listen("taken", who, item)
        elif kind == "eplb":
            self.eplb_reports.append((who, payload))
        elif kind == "refused":
            self._deliver(who, ValueError(payload), True)
        elif kind in ("error", "stopped"):
            self.fail(f"rank {who}: {payload or 'stopped'}")

    def _listen(self, kind: str, rank: int, payload: Any) -> None:
        if self.listener is None:
            raise RuntimeError(f"{self.name}: a {kind!r} event with nobody to hear it")
        self.listener(kind, rank, payload)

    def fail(self, reason: str) -> None:
        """The group is gone: every open request hears why. Waits for an event being applied on
        another thread; events applied after this see the error and are dropped."""
        with self._events, self._lock:
            self.error = self.error or reason
            sinks, self._sinks, self._owner = list(self._sinks.values()), {}, {}
        for sink in sinks:
            _notify(sink, RuntimeError(f"{self.name} failed: {reason}"))

    def _deliver(self, request_id: str, item: Any, last: bool) -> None:
        with self._lock:
            sink = self._sinks.get(request_id)
            if last:
                self._sinks.pop(request_id, None)
                self._owner.pop(request_id, None)
        if sink is not None:
            _notify(sink, item)
