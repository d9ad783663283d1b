"""An expert-parallel group as local processes: one engine per rank, attention data-parallel.

Each rank process (`ep_rank.py`) holds its own requests, its own latent cache and its share of
the experts, and steps in lockstep with the others (see there).

The driver side (`EPGroup`) offers the same interface as `AsyncEngine` (check, submit with a
sink, abort): it places each request on the rank with the fewest outstanding requests and
forwards that rank's deltas to the request's sink. The cluster runtime places the same ranks as
Ray actors on GPUs.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import threading
import time
import weakref
from typing import Any

from moecluster.workers.engine.async_engine import Sink
from moecluster.workers.engine.engine_config import EngineConfig
from moecluster.workers.engine.ep_rank import run_rank
from moecluster.workers.engine.outputs import RequestOutput
from moecluster.workers.engine.rank_streams import RankStreams
from moecluster.workers.engine.request_limits import RequestLimits
from moecluster.workers.engine.sampling_params import SamplingParams


PORT_ATTEMPTS = 3


class EPGroup:
    """Driver of `world` rank processes on this machine (gloo on the CPU, NCCL on GPUs)."""

    def __init__(self, cfg: EngineConfig, world: int, start_timeout: float = 600.0) -> None:
        if world < 2:
            raise ValueError(f"an expert-parallel group needs at least 2 ranks, got {world}")
        self.world, self.cfg, self._start_timeout = world, cfg, start_timeout
        self._closed = True  # until a start succeeds
        # Stop the ranks at exit while threads can still start (queue puts start a feeder thread).
        atexit.register(_shutdown_at_exit, weakref.ref(self))
        for attempt in range(PORT_ATTEMPTS):
            try:
                limits = self._start()
                break
            except _PortTaken:
                if attempt + 1 == PORT_ATTEMPTS:
                    raise RuntimeError(f"EP rank 0 could not bind a rendezvous port in {PORT_ATTEMPTS} tries") from None
        self.limits = limits[0]
        self.streams = RankStreams(world, "the expert-parallel group")
        self._reader = threading.Thread(target=self._read, name="moecluster-ep-reader", daemon=True)
        self._reader.start()

    def _start(self) -> list[RequestLimits]:
        """Start the rank processes on a free port; each rank's limits. The port is free when picked
        but another process may take it before rank 0 binds it: then _PortTaken (ranks stopped)."""
        ctx = mp.get_context("spawn")
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(self.world)]
        with _socket() as s:
            port = s.getsockname()[1]
        self._procs = [
            ctx.Process(target=run_rank, args=(r, self.world, port, self.cfg, self._inboxes[r], self._outbox), daemon=True)
            for r in range(self.world)
        ]
        for p in self._procs:
            p.start()
        self._closed = False
        limits: list[RequestLimits] = []
        try:
            while len(limits) < self.world:
                kind, rank, payload = self._outbox.get(timeout=self._start_timeout)
                if kind == "error":
                    if "EADDRINUSE" in str(payload) or "address already in use" in str(payload).lower():
                        raise _PortTaken(payload)
                    raise RuntimeError(f"EP rank {rank} failed to start: {payload}")
                limits.append(payload)
        except BaseException:  # (a start timeout included) no rank of this attempt outlives it
            self._stop_ranks(5.0)
            self._closed = True
            raise
        return limits

    @property
    def eplb_reports(self) -> list:
        return self.streams.eplb_reports

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        return self.limits.check(prompt_ids, params)

    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink, prompt: str | None = None
    ) -> None:
        self.check(prompt_ids, params)
        ids = list(prompt_ids)
        rank = self.streams.open(request_id, lambda item: sink(_with_prompt(item, prompt, ids)))
        self._inboxes[rank].put(("add", request_id, ids, params, prompt))

    def rebalance(self) -> None:
        """Ask every rank to rebalance its experts at the next step boundary (EPLB)."""
        for inbox in self._inboxes:
            inbox.put(("rebalance",))

    def abort(self, request_id: str) -> None:
        rank = self.streams.owner(request_id)
        if rank is not None:
            self._inboxes[rank].put(("abort", request_id))

    def _read(self) -> None:
        while self.streams.error is None:
            self.streams.handle(self._outbox.get())

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_ranks(timeout)

    def _stop_ranks(self, timeout: float) -> None:
        for inbox in self._inboxes:
            inbox.put(("stop",))
        deadline = time.monotonic() + timeout  # one deadline for all: ranks stuck in the rendezvous
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()


class _PortTaken(Exception):
    """Rank 0 found the rendezvous port taken."""


def _socket():  # noqa: ANN202
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def _shutdown_at_exit(ref: weakref.ref) -> None:
    group = ref()
    if group is not None:
        group.shutdown(timeout=5.0)


def _with_prompt(item: Any, prompt: str | None, prompt_ids: list[int]) -> Any:
    """A rank's output with the prompt it travels without (`ep_rank`), as `AsyncEngine` delivers it."""
    if isinstance(item, RequestOutput):
        item.prompt, item.prompt_token_ids = prompt, prompt_ids
    return item
