"""Where a decode step's time goes (GPU): one engine in this process on a full-width slice with
random weights; wall time per phase (schedule, prepare, forward, logits + sampling, outputs)
and the profiler's busiest CUDA kernels over a few steps.

    python scripts/profile_decode.py --preset deepseek-v3 --layers 3 --concurrency 64 --context 2000
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="deepseek-v3")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--dense-layers", type=int, default=1)
    p.add_argument("--routed-experts", type=int, default=None,
                   help="one EP rank's share of the experts (the rank proxy, cluster/bench/slice_model.py)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--context", type=int, default=2000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pstats", default="", help="also profile the host (cProfile) and write pstats here")
    p.add_argument("--top", type=int, default=16, help="how many of the busiest kernels to list")
    p.add_argument("--trace", default="", help="also write the profiled steps as a Chrome trace here")
    p.add_argument("--decode-experts-w16", action="store_true", help="FP8 routed experts run W8A16 in decode graphs")
    p.add_argument("--decode-linears-w16", action="store_true", help="FP8 dense linears run W8A16 in decode graphs")
    p.add_argument("--memory-utilization", type=float, default=0.8, help="share of GPU memory for weights + cache")
    p.add_argument("--sync-debug", action="store_true",
                   help="print where torch synchronizes the host in two asynchronous steps, and allocator retries")
    args = p.parse_args()

    from moecluster.cluster.bench.slice_model import make_slice
    from moecluster.cluster.stats import percentile
    from moecluster.workers.engine.engine_config import EngineConfig, build_engine
    from moecluster.workers.engine.sampling_params import SamplingParams

    tmp = Path(tempfile.mkdtemp())
    model = make_slice(tmp / args.preset, args.preset, args.layers, args.dense_layers, args.routed_experts)
    core, _ = build_engine(EngineConfig(model=model, load_format="random", dtype="bfloat16", device="cuda",
                                        gpu_memory_utilization=args.memory_utilization, max_model_len=args.context + 256,
                                        max_num_seqs=args.concurrency, async_scheduling=False,
                                        decode_experts_w8a8=not args.decode_experts_w16,
                                        decode_linears_w8a8=not args.decode_linears_w16))
    rng = random.Random(0)
    vocab = core.runner.model.cfg.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.steps * 3 + 16, ignore_eos=True)
    for i in range(args.concurrency):
        core.add_request(f"r{i}", [rng.randrange(vocab) for _ in range(args.context)], params)
    while core.scheduler.waiting or any(s.num_computed < s.prompt_len for s in core.scheduler.running):
        core.step()
    for _ in range(5):  # warm
        core.step()
    phases: dict[str, list[float]] = {k: [] for k in ("schedule", "prepare", "forward", "step")}
    runner = core.runner
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sched = core.schedule()
        t1 = time.perf_counter()
        input_ids, meta = runner.prepare(sched.scheduled)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        hidden = runner.model(input_ids, meta, runner.kv_caches)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        core.execute(sched)  # the real step (forward again) to keep the engine's state right
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        phases["schedule"].append(t1 - t0)
        phases["prepare"].append(t2 - t1)
        phases["forward"].append(t3 - t2)
        phases["step"].append(t4 - t3)
        del hidden
    for k, v in phases.items():
        print(f"{k:>14}: p50 {percentile(v, 0.5) * 1e3:8.2f} ms")
    # the phases above read every step's samples before the next (they run the eager forward on the
    # host's token ids); from here on the engine schedules asynchronously, as it serves
    core.flush()
    core.async_scheduling = True
    core.timer.clear()
    for _ in range(args.steps):
        core.step()
    print("engine step phases (p50 ms):", {k: round(v["p50_ms"], 2) for k, v in core.timer.snapshot().items()})
    if args.sync_debug:
        _sync_report(core)
    if args.pstats:
        _host_profile(core, args.steps, args.pstats)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            core.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in events) / 1e3 / 3
    kernels = sum(e.count for e in events if e.self_device_time_total > 0) / 3
    print(f"GPU busy per step (sum of kernel time): {cuda_total:.2f} ms in {kernels:.0f} kernels")
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:args.top]
    for e in top:
        print(f"  {e.self_device_time_total / 1e3 / 3:7.3f} ms/step  x{e.count // 3:<4} {e.key[:110]}")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    print(f"host time per step: {sum(e.self_cpu_time_total for e in events) / 1e3 / 3:.2f} ms; top:")
    for e in cpu:
        print(f"  {e.self_cpu_time_total / 1e3 / 3:7.3f} ms/step  x{e.count // 3:<4} {e.key[:70]}")


def _sync_report(core) -> None:  # noqa: ANN001
    """Which host calls wait for the GPU in asynchronous steps: torch's synchronizing operations
    (with their stacks), and the caching allocators' retries and fresh allocations (a cudaFree or
    a pinned cudaHostAlloc also waits for the device, and the sync debug mode does not see those)."""
    import traceback
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        print(f"SYNC: {message}")
        print("".join(traceback.format_stack(limit=12)[:-2]))

    before = torch.cuda.memory_stats()
    host_before = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    old = warnings.showwarning
    warnings.showwarning = show
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(4):
            core.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    after = torch.cuda.memory_stats()
    for key in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams"):
        print(f"allocator {key}: +{after.get(key, 0) - before.get(key, 0)} in 4 steps")
    if host_before:
        host_after = torch.cuda.host_memory_stats()
        for key in ("num_host_alloc", "num_host_free"):
            print(f"host allocator {key}: +{host_after.get(key, 0) - host_before.get(key, 0)} in 4 steps")


def _host_profile(core, steps: int, path: str) -> None:  # noqa: ANN001
    """Python-level host time of `steps` engine steps: the functions with the most own time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        core.step()
    prof.disable()
    torch.cuda.synchronize()
    print(f"host profile: {(time.perf_counter() - t0) / steps * 1e3:.2f} ms per step under cProfile")
    prof.dump_stats(path)
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
