"""One rank of an expert-parallel group: join the group, build the engine, step in lockstep.

Used by the local-process group (`ep_group.py`) and by the cluster's Ray rank actors.
Commands arrive on `inbox`:
  ("add", request_id, prompt_ids, params, prompt), ("abort", request_id), ("rebalance",), ("stop",);
  for the prefill / decode split also ("prefilled", inner_id, KVHandoff) on a decode rank and
  ("ack", request_id, sample_index) on a prefill rank.
Events leave on `outbox`:
  ("ready", rank, RequestLimits), ("out", rank, [WireOutput]), ("refused", request_id, reason),
  ("eplb", rank, report), ("error", rank, reason);
  ("handoff", rank, ([WireOutput], [KVHandoff])) when a prefill step handed samples over (its
  outputs and handoffs in one event, so a driver sees both or neither);
  ("taken", rank, [(inner_id, outcome)]) when a decode rank took handoffs ("received", or
  "refilled" from the prompt after failed transfers): the prefill side may free its copy.
Any queue with put / get(timeout) / get_nowait works. Outputs travel as plain tuples
(`outputs.to_wire`; `RankStreams` turns them back) and without their prompt (text and ids; the
driver that submitted the request has both): pickled with it, one decode step's outputs for 64
streams of 2000-token prompts were 1 MB (4.7 ms to pickle, 6.2 ms to unpickle on a 2-core CPU
machine), 6 KB without.

Lockstep: each rank schedules its step, then one all-reduce agrees on (largest batch, any work,
stop, rebalance, some rank must run eagerly); when any rank has tokens to compute all of them run
the forward, a rank with nothing scheduled on an empty batch, so every MoE layer's collectives
complete; when none has, none runs one (each reads its step in flight, if any). When
no rank must run eagerly, all replay the decode CUDA graph of the size that fits the largest batch.
The agreement travels over a gloo group on the CPU: on the GPU it would queue behind the step in
flight, and asynchronous scheduling (`EngineCore.execute`) agrees on the next step while the GPU
still computes this one.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moecluster.workers.engine.engine_config import EngineConfig, build_core
from moecluster.workers.engine.engine_core import EngineCore, Role
from moecluster.workers.engine.eplb_apply import rebalance_group
from moecluster.workers.engine.expert_parallel import ExpertParallel
from moecluster.workers.engine.handoff_queue import HandoffQueue
from moecluster.workers.engine.outputs import CompletionOutput, RequestOutput, to_wire
from moecluster.workers.engine.scheduler import SchedulerOutput
from moecluster.text.tokenizer import load_tokenizer
from moecluster.workers.transfer.kv_transfer import KVTransfer

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.005  # how long an idle group waits for requests before agreeing again


def join_group(
    rank: int, world: int, master_addr: str, port: int, cfg: EngineConfig,
    role: Role = "both", transfer: KVTransfer | None = None,
) -> tuple[EngineCore, torch.device]:
    """Initialise torch.distributed for this rank (NCCL on cuda, gloo on cpu) and build its engine
    (a prefill or decode role takes the KV transfer its handoffs travel by)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(port))
    device = cfg.resolved_device()
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if world == 1 else rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    ep = ExpertParallel(rank, world, redundant_slots=cfg.eplb_redundant_slots)
    core = build_core(cfg, tokenizer, role, transfer, ep=ep)
    return core, device


def lockstep_loop(core: EngineCore, rank: int, device: torch.device, cfg: EngineConfig, inbox: Any, outbox: Any) -> None:
    """Step with the rest of the group until one of the ranks is told to stop.

    Runs on its own thread (the rank actor's, the EP profiler's): the CUDA current device is per
    thread, so it is set here too, or the streams of a rank that sees several GPUs (rank 1 of an
    unisolated process group) would be device 0's: its graph replays and copy events would go to
    the wrong device ("Event device 1 does not match recording stream's device")."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    control = _Control(handoffs=HandoffQueue(core) if core.role == "decode" else None)
    group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None  # every rank, same order
    busy, steps = False, 0
    while True:
        _drain(core, inbox, outbox, control, wait=0.0 if busy or core.has_unfinished() else IDLE_WAIT_S)
        if control.handoffs:
            taken = control.handoffs.deliver()
            if taken:
                outbox.put(("taken", rank, [(t.inner_id, t.outcome) for t in taken]))
        t0 = time.perf_counter()
        sched = core.schedule() if core.has_unfinished() else None
        t1 = time.perf_counter()
        graphs = core.runner.graphs
        eager = bool(sched and sched.scheduled) and not (graphs is not None and graphs.can_run(sched.scheduled))
        mine = [sched.num_tokens if sched else 0, int(sched is not None), int(control.stop), int(control.rebalance),
                int(eager)]
        flags = _group_max(mine, group)
        max_tokens, busy = flags[0], bool(flags[1])  # the group's largest batch this step
        # every rank decodes only (or idles): all replay the decode graph of one size
        size = (graphs.size_for(max_tokens) if graphs is not None and not flags[4] and 0 < max_tokens <= graphs.max_batch
                else None)
        t2 = time.perf_counter()
        log.debug("rank %d step %d: %d tokens here, at most %d in the group", rank, steps, mine[0], max_tokens)
        if flags[2]:
            _emit(core, rank, outbox, core.flush())
            return
        ran = busy and max_tokens > 0  # the same on every rank: both come from the group's max
        if ran:
            outs = core.execute(sched if sched is not None else SchedulerOutput(), always_forward=True, graph_size=size)
            steps += 1
            core.timer.record("schedule", t1 - t0)
            core.timer.record("sync", t2 - t1)
            _emit(core, rank, outbox, outs)
            took = time.perf_counter() - t0
            core.timer.record("step", took)
            if sched is not None and sched.scheduled and mine[0] == len(sched.scheduled):  # mine[0]: its tokens
                replayed = size is not None and graphs.captured  # a size is agreed only where graphs exist
                reason = None if replayed else _eager_reason(graphs, size, bool(flags[4]), max_tokens)
                core.timer.record_decode(len(sched.samplers), took, reason)  # one token a sequence
        else:  # no rank computes a token this step: no forward; the step in flight, if any, is read
            _emit(core, rank, outbox, core.flush())
        due = cfg.eplb_interval_steps and ran and steps % cfg.eplb_interval_steps == 0
        if flags[3] or due:  # every rank reaches this at the same step boundary
            control.rebalance = False
            _emit(core, rank, outbox, core.flush())  # the step in flight ran on the old placement
            report = rebalance_group(core.runner.model, rank)
            if graphs is not None:
                graphs.sync_placement()  # the captured dispatchers follow the moved experts
            outbox.put(("eplb", rank, report))


def _eager_reason(graphs: Any, size: int | None, group_eager: bool, max_tokens: int) -> str:
    """Why a step that only decoded here did not replay a captured graph."""
    if graphs is None:
        return "no decode graphs (CPU, graphs off, or a dispatcher graphs cannot hold)"
    if size is not None:
        return "graphs not captured (CPU)"
    if group_eager:
        return "a rank of the group ran a prefill or mixed step"
    return f"the group's largest batch ({max_tokens}) is over the largest graph ({graphs.max_batch})"


def _emit(core: EngineCore, rank: int, outbox: Any, outs: list[RequestOutput]) -> None:
    """Put a step's outputs on the outbox (with the handoffs the step made, in one event)."""
    handoffs = core.take_handoffs()
    if handoffs:
        outbox.put(("handoff", rank, (to_wire(outs), handoffs)))
    elif outs:
        outbox.put(("out", rank, to_wire(outs)))


def _group_max(values: list[int], group: Any) -> list[int]:
    """Element-wise max over the group's ranks (one small all_reduce over the gloo `group`); a
    group of one (group None) is its own answer."""
    if group is None:
        return values
    flags = torch.tensor(values)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return flags.tolist()


def run_rank(rank: int, world: int, port: int, cfg: EngineConfig, inbox: Any, outbox: Any) -> None:
    """The body of one local rank process."""
    try:
        core, device = join_group(rank, world, "127.0.0.1", port, cfg)
        outbox.put(("ready", rank, core.limits))
        lockstep_loop(core, rank, device, cfg, inbox, outbox)
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - the driver must hear why a rank died
        outbox.put(("error", rank, repr(e)))
        raise


@dataclass
class _Control:
    stop: bool = False
    rebalance: bool = False
    handoffs: HandoffQueue | None = None  # a decode rank's handoffs not taken yet


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
            if out is None and control.handoffs and control.handoffs.drop(lambda _, inner_id: inner_id == cmd[1]):
                out = RequestOutput(cmd[1], None, [], [CompletionOutput(0, "", [], finish_reason="abort")], True)
            if out is not None:
                outbox.put(("out", None, to_wire([out])))
        elif kind == "ack":
            core.ack(cmd[1], cmd[2])
        elif kind == "prefilled":
            _, inner_id, handoff = cmd
            if control.handoffs is None:
                outbox.put(("refused", inner_id, f"a {core.role!r} engine does not take prefilled requests"))
            else:
                control.handoffs.offer(handoff, inner_id)
        elif kind == "add":
            _, request_id, prompt_ids, params, prompt = cmd
            try:
                core.add_request(request_id, prompt_ids, params, prompt)
            except ValueError as e:
                outbox.put(("refused", request_id, str(e)))
