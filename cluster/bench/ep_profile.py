"""Where an expert-parallel decode step's time goes: `--world` processes, one rank each of one EP
group (NCCL on GPUs, gloo on CPUs), stepping through the real lockstep loop (`ep_rank.py`: the
agreement all-reduce, decode CUDA graphs with the gather dispatch). Each rank takes
concurrency / world requests of `--context` random prompt tokens; once all decode, each rank
profiles `--steps` decode steps and prints its step phases (the engine's step timer) and busiest
kernels (CUDA) or ops (CPU). Collective kernels include the time spent waiting for the slower rank.

    python scripts/profile_ep_decode.py --world 2 --preset deepseek-v3 --layers 4 --concurrency 64 --context 2000
    python scripts/profile_ep_decode.py --world 2 --device cpu --model CKPT --concurrency 4 --context 16 --steps 3

(The rank body lives in this module so spawned processes can import it.)
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from moecluster.cluster.p2p_transfer import free_port


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, model: str, results: Any, barrier: Any) -> None:
    try:
        results.put(_profile_rank(rank, world, port, args, model, barrier))
    except BaseException as e:  # noqa: BLE001 - the driver must hear why, not wait for a report
        results.put({"rank": rank, "error": repr(e) + (f" from {e.__cause__!r}" if e.__cause__ else "")})
        raise


def _profile_rank(rank: int, world: int, port: int, args: argparse.Namespace, model: str, barrier: Any) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from moecluster.workers.engine.engine_config import EngineConfig
    from moecluster.workers.engine.ep_rank import join_group, lockstep_loop
    from moecluster.workers.engine.sampling_params import SamplingParams

    per_rank = max(1, args.concurrency // world)
    new_tokens = args.warm + args.steps + 32  # every request decodes through the whole window
    max_len = args.context + new_tokens + 16
    extra = (dict(gpu_memory_utilization=0.8) if args.device == "cuda"
             else dict(num_kv_blocks=per_rank * (max_len // 16 + 2)))
    cfg = EngineConfig(model=Path(model), load_format="safetensors" if args.model else "random", dtype=args.dtype,
                       device=args.device, block_size=16 if args.device == "cpu" else 64,
                       max_model_len=max_len, max_num_seqs=per_rank, **extra)
    core, device = join_group(rank, world, "127.0.0.1", port, cfg)
    inbox: queue.Queue = queue.Queue()
    outbox: queue.Queue = queue.Queue()
    rng = random.Random(rank)
    vocab = core.runner.model.cfg.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(per_rank):
        inbox.put(("add", f"r{rank}-{i}", [rng.randrange(2, vocab) for _ in range(args.context)], params, None))
    # The profiler runs on the loop's thread (it records the CPU ops of the thread that starts it):
    # the engine's execute is wrapped to count decode-only steps, start after `warm` and stop after
    # `steps` more.
    cuda = device.type == "cuda"
    state: dict[str, Any] = {"decode": 0, "prof": None, "t0": 0.0, "wall": 0.0}
    done = threading.Event()
    execute = core.execute

    def counted(sched, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        decode = len(sched.scheduled) == per_rank and sched.num_tokens == per_rank
        if decode and state["decode"] == args.warm and state["prof"] is None:
            core.timer.clear()
            state["prof"] = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        out = execute(sched, *a, **kw)
        state["decode"] += decode
        if state["prof"] is not None and not done.is_set() and state["decode"] == args.warm + args.steps:
            if cuda:
                torch.cuda.synchronize(device)
            state["wall"] = (time.perf_counter() - state["t0"]) / args.steps
            state["prof"].__exit__(None, None, None)
            done.set()
        return out

    core.execute = counted  # type: ignore[method-assign]

    def run_loop() -> None:
        try:
            lockstep_loop(core, rank, device, cfg, inbox, outbox)
        except BaseException as e:  # noqa: BLE001 - reported by this rank, not lost on the thread
            state["loop_error"] = e
            done.set()

    loop = threading.Thread(target=run_loop, daemon=True)
    loop.start()
    if not done.wait(timeout=1800):
        raise TimeoutError(f"rank {rank}: {state['decode']} decode steps in 30 minutes")
    if "loop_error" in state:
        raise RuntimeError(f"rank {rank}: the lockstep loop failed after {state['decode']} decode steps") from state["loop_error"]
    prof, wall = state["prof"], state["wall"]
    phases = {k: round(v["p50_ms"], 3) for k, v in core.timer.snapshot().items()}  # (steps after the window too)
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[: args.top]
    report = {
        "rank": rank, "wall_ms_per_step": wall * 1e3, "phases_p50_ms": phases,
        "busy_ms_per_step": sum(getattr(e, attr) for e in events) / 1e3 / args.steps,
        "top": [{"ms_per_step": getattr(e, attr) / 1e3 / args.steps, "calls_per_step": e.count / args.steps,
                 "name": e.key[:90]} for e in top],
        "top_host": [{"ms_per_step": e.self_cpu_time_total / 1e3 / args.steps, "calls_per_step": e.count / args.steps,
                      "name": e.key[:90]} for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]],
    }
    barrier.wait(timeout=1800)  # every rank's window is over: the group may stop
    if rank == 0:
        inbox.put(("stop",))
    loop.join(timeout=120)
    return report


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--model", default="", help="checkpoint (default on cuda: a random slice of --preset)")
    p.add_argument("--preset", default="deepseek-v3")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="")
    p.add_argument("--concurrency", type=int, default=64, help="requests over the whole group")
    p.add_argument("--context", type=int, default=2000)
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default="", help="JSON file for every rank's report")
    args = p.parse_args(argv)
    if args.world < 1 or args.steps < 1 or args.warm < 0 or args.concurrency < args.world:
        raise SystemExit("need --world >= 1, --steps >= 1, --warm >= 0 and --concurrency >= --world")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs as many GPUs, found {torch.cuda.device_count()}")
    model = args.model
    if not model:
        if args.device != "cuda":
            raise SystemExit("--device cpu needs --model (a small checkpoint): the slices are full width")
        from moecluster.cluster.bench.slice_model import make_slice

        model = str(make_slice(Path(tempfile.mkdtemp()) / args.preset, args.preset, args.layers))
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    barrier = ctx.Barrier(args.world)
    procs = [ctx.Process(target=_rank, args=(r, args.world, port, args, model, results, barrier))
             for r in range(args.world)]
    for proc in procs:
        proc.start()
    try:
        reports = []
        for _ in procs:
            report = results.get(timeout=1800)
            if "error" in report:
                raise RuntimeError(f"rank {report['rank']} failed: {report['error']}")
            reports.append(report)
        reports.sort(key=lambda r: r["rank"])
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    for r in reports:
        print(f"rank {r['rank']}: {r['wall_ms_per_step']:.2f} ms per decode step (wall), busy "
              f"{r['busy_ms_per_step']:.2f} ms, phases p50 {r['phases_p50_ms']}")
        tables = ([("device time", "top"), ("host (self CPU time)", "top_host")] if args.device == "cuda"
                  else [("self CPU time", "top")])  # on the CPU the two are one table
        for title, key in tables:
            print(f"  busiest by {title}:")
            for e in r[key]:
                print(f"  {e['ms_per_step']:8.3f} ms/step  x{e['calls_per_step']:<6.1f} {e['name']}")
    if args.out:
        Path(args.out).write_text(json.dumps(reports, indent=2))
    return reports


if __name__ == "__main__":
    main()
