"""An expert-parallel group as local processes: one engine per rank, attention data-parallel.

Each rank process holds its own requests, its own latent cache and its share of the experts
(`ExpertParallel`). Every MoE layer is a collective, so the ranks step in lockstep: before each
step they agree, with one small all-reduce, whether any rank has work and whether to stop; when
any rank has work, all of them run a step, and a rank with nothing scheduled runs an empty batch
so the all-to-alls still complete. When none has work they wait briefly for requests and agree again.

The driver side (`EPGroup`) offers the same interface as `AsyncEngine` (check, submit with a
sink, abort): it places each request on the rank with the fewest outstanding requests and
forwards that rank's deltas to the request's sink. The cluster runtime places the same ranks as
Ray actors on GPUs.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moecluster.workers.engine.async_engine import EngineDead, Sink, _notify
from moecluster.workers.engine.engine_config import EngineConfig, build_core
from moecluster.workers.engine.eplb_apply import RebalanceReport, rebalance_group
from moecluster.workers.engine.expert_parallel import ExpertParallel
from moecluster.workers.engine.request_limits import RequestLimits
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.engine.scheduler import SchedulerOutput
from moecluster.workers.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.005  # how long an idle group waits for requests before agreeing again


def run_rank(rank: int, world: int, port: int, cfg: EngineConfig, inbox: Any, outbox: Any) -> None:
    """The body of one rank process: build the engine, then step in lockstep until told to stop."""
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        device = cfg.resolved_device()
        if device.type == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        core = build_core(cfg, load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code),
                          ep=ExpertParallel(rank, world, redundant_slots=cfg.eplb_redundant_slots))
        outbox.put(("ready", rank, core.limits))
        control = _Control()
        busy, steps = False, 0
        while True:
            _drain(core, inbox, outbox, control, wait=0.0 if busy or core.has_unfinished() else IDLE_WAIT_S)
            sched = core.schedule() if core.has_unfinished() else None
            mine = [sched.num_tokens if sched else 0, int(sched is not None), int(control.stop), int(control.rebalance)]
            flags = torch.tensor(mine, device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # NCCL wants it on the GPU; 4 ints either way
            max_tokens, busy = int(flags[0]), bool(flags[1])  # the group's largest batch this step
            log.debug("rank %d step %d: %d tokens here, at most %d in the group", rank, steps, mine[0], max_tokens)
            if flags[2]:
                break
            if busy:
                outs = core.execute(sched if sched is not None else SchedulerOutput(), always_forward=True)
                steps += 1
                if outs:
                    outbox.put(("out", rank, outs))
            due = cfg.eplb_interval_steps and busy and steps % cfg.eplb_interval_steps == 0
            if flags[3] or due:  # every rank reaches this at the same step boundary
                control.rebalance = False
                outbox.put(("eplb", rank, rebalance_group(core.runner.model, rank)))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - the driver must hear why a rank died
        outbox.put(("error", rank, repr(e)))
        raise


@dataclass
class _Control:
    stop: bool = False
    rebalance: bool = False


def _drain(core: Any, inbox: Any, outbox: Any, control: _Control, wait: float) -> None:
    """Apply queued commands; stop and rebalance requests are noted in `control`."""
    while True:
        try:
            cmd = inbox.get(timeout=wait) if wait else inbox.get_nowait()
        except queue.Empty:
            return
        wait = 0.0
        kind = cmd[0]
        if kind == "stop":
            control.stop = True
        elif kind == "rebalance":
            control.rebalance = True
        elif kind == "abort":
            out = core.abort(cmd[1])
            if out is not None:
                outbox.put(("out", None, [out]))
        elif kind == "add":
            _, request_id, prompt_ids, params, prompt = cmd
            try:
                core.add_request(request_id, prompt_ids, params, prompt)
            except ValueError as e:
                outbox.put(("refused", request_id, str(e)))


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
