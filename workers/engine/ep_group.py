"""An expert-parallel group as local processes: one engine per rank, attention data-parallel.

Each rank process (`ep_rank.py`) holds its own requests, its own latent cache and its share of
the experts, and steps in lockstep with the others (see there).

The driver side (`EPGroup`) offers the same interface as `AsyncEngine` (check, submit with a
sink, abort): it places each request on the rank with the fewest outstanding requests and
forwards that rank's deltas to the request's sink. The cluster runtime places the same ranks as
Ray actors on GPUs.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any

from moecluster.workers.engine.async_engine import EngineDead, Sink, _notify
from moecluster.workers.engine.engine_config import EngineConfig
from moecluster.workers.engine.ep_rank import run_rank
from moecluster.workers.engine.eplb_apply import RebalanceReport
from moecluster.workers.engine.request_limits import RequestLimits
from moecluster.workers.engine.sampling_params import SamplingParams


class EPGroup:
    """Driver of `world` rank processes on this machine (gloo on the CPU, NCCL on GPUs)."""

    def __init__(self, cfg: EngineConfig, world: int, start_timeout: float = 600.0) -> None:
        if world < 2:
            raise ValueError(f"an expert-parallel group needs at least 2 ranks, got {world}")
        ctx = mp.get_context("spawn")
        self.world = world
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(world)]
        with _socket() as s:
            port = s.getsockname()[1]
        self._procs = [
            ctx.Process(target=run_rank, args=(r, world, port, cfg, self._inboxes[r], self._outbox), daemon=True)
            for r in range(world)
        ]
        for p in self._procs:
            p.start()
        limits: list[RequestLimits] = []
        while len(limits) < world:
            kind, rank, payload = self._outbox.get(timeout=start_timeout)
            if kind == "error":
                self.shutdown()
                raise RuntimeError(f"EP rank {rank} failed to start: {payload}")
            limits.append(payload)
        self.limits = limits[0]
        self._sinks: dict[str, Sink] = {}
        self._owner: dict[str, int] = {}
        self._lock = threading.Lock()
        self._error: str | None = None
        self.eplb_reports: list[tuple[int, RebalanceReport]] = []  # (rank, report), as they arrive
        self._reader = threading.Thread(target=self._read, name="moecluster-ep-reader", daemon=True)
        self._reader.start()

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        return self.limits.check(prompt_ids, params)

    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink, prompt: str | None = None
    ) -> None:
        if self._error is not None:
            raise EngineDead(f"the expert-parallel group failed: {self._error}")
        self.check(prompt_ids, params)
        with self._lock:
            load = [0] * self.world
            for owner in self._owner.values():
                load[owner] += 1
            rank = min(range(self.world), key=lambda r: (load[r], r))
            self._sinks[request_id] = sink
            self._owner[request_id] = rank
        self._inboxes[rank].put(("add", request_id, list(prompt_ids), params, prompt))

    def rebalance(self) -> None:
        """Ask every rank to rebalance its experts at the next step boundary (EPLB)."""
        for inbox in self._inboxes:
            inbox.put(("rebalance",))

    def abort(self, request_id: str) -> None:
        rank = self._owner.get(request_id)
        if rank is not None:
            self._inboxes[rank].put(("abort", request_id))

    def _read(self) -> None:
        while True:
            kind, who, payload = self._outbox.get()
            if kind == "out":
                for out in payload:
                    self._deliver(out.request_id, out, out.finished)
            elif kind == "eplb":
                self.eplb_reports.append((who, payload))
            elif kind == "refused":
                self._deliver(who, ValueError(payload), True)
            elif kind == "error":
                self._error = f"rank {who}: {payload}"
                with self._lock:
                    sinks, self._sinks, self._owner = list(self._sinks.values()), {}, {}
                for sink in sinks:
                    _notify(sink, RuntimeError(self._error))
                return

    def _deliver(self, request_id: str, item: Any, last: bool) -> None:
        with self._lock:
            sink = self._sinks.get(request_id)
            if last:
                self._sinks.pop(request_id, None)
                self._owner.pop(request_id, None)
        if sink is not None:
            _notify(sink, item)

    def shutdown(self, timeout: float = 30.0) -> None:
        for inbox in self._inboxes:
            inbox.put(("stop",))
        for p in self._procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()


def _socket():  # noqa: ANN202
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s
