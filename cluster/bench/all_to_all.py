"""`moecluster bench a2a`: expert-parallel dispatch + combine between the GPUs of this machine.

One process per GPU (NCCL; gloo with `--device cpu` for a smoke run). Each rank holds `tokens`
tokens of width `hidden` in bf16 and routes them top-k over `experts` experts placed contiguously
over the ranks, with uniform random choices (so about (world - 1) / world of the rows leave the
rank). Timed, with the device synchronised around each call: `AllToAllDispatch.dispatch` (counts
exchange, row exchange, local-slot ids, grouping) and `combine` (the way back and the weighted
sum), with identity experts in between. Bandwidth per GPU = bytes of rows that leave the rank
(out) divided by the time, the figure DeepEP reports (153 / 158 GB/s dispatch / combine,
intranode EP8 on H800 over NVLink).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from moecluster.cluster.bench import machine_info, summarize_ns, write_json


@dataclass(frozen=True)
class A2ABenchConfig:
    tokens: int = 4096
    hidden: int = 7168
    top_k: int = 8
    experts: int = 256
    world: int = 0  # 0: every visible GPU
    iters: int = 20
    warmup: int = 5
    device: str = "cuda"
    seed: int = 0


def _worker(rank: int, world: int, port: int, cfg: A2ABenchConfig, queue: Any) -> None:
    from moecluster.router.experts.all_to_all import AllToAllDispatch
    from moecluster.router.experts.placement import ExpertPlacement

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = cfg.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    hidden = torch.randn(cfg.tokens, cfg.hidden, device=device, generator=g).to(torch.bfloat16)
    ids = torch.rand(cfg.tokens, cfg.experts, device=device, generator=g).topk(cfg.top_k, dim=-1).indices
    weights = torch.rand(cfg.tokens, cfg.top_k, device=device, generator=g)
    a2a = AllToAllDispatch(ExpertPlacement.contiguous(cfg.experts, world), rank, device=device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    times: dict[str, list[int]] = {"dispatch": [], "combine": []}
    for i in range(cfg.warmup + cfg.iters):
        sync()
        t0 = time.perf_counter_ns()
        d = a2a.dispatch(hidden, ids, weights)
        sync()
        t1 = time.perf_counter_ns()
        out = a2a.combine(d.tokens, d)
        sync()
        t2 = time.perf_counter_ns()
        if i >= cfg.warmup:
            times["dispatch"].append(t1 - t0)
            times["combine"].append(t2 - t1)
    h = d.handle
    off_rank = sum(n for r, n in enumerate(h.send_counts) if r != rank)  # type: ignore[attr-defined]
    row_bytes = cfg.hidden * 2
    queue.put({
        "rank": rank,
        "rows_sent": sum(h.send_counts),  # type: ignore[attr-defined]
        "rows_off_rank": off_rank,
        "bytes_off_rank": off_rank * row_bytes,
        "ms": {k: summarize_ns(v) for k, v in times.items()},
        "checksum": float(out.float().abs().sum()),
    })
    dist.destroy_process_group()


def run(cfg: A2ABenchConfig, out: Path, console: Console | None = None) -> dict:
    world = cfg.world or (torch.cuda.device_count() if cfg.device == "cuda" else 2)
    if world < 2:
        raise ValueError(f"the all-to-all benchmark needs at least 2 ranks, have {world} (GPUs: {torch.cuda.device_count()})")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        ranks = sorted((queue.get(timeout=600) for _ in range(world)), key=lambda r: r["rank"])
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    for r in ranks:
        for part in ("dispatch", "combine"):
            r[f"{part}_GBps"] = r["bytes_off_rank"] / (r["ms"][part]["p50"] * 1e6)
    result = {"config": {**asdict(cfg), "world": world}, "machine": machine_info(), "ranks": ranks,
              "reference": {"DeepEP intranode EP8 H800 GB/s": {"dispatch": 153, "combine": 158}}}
    write_json(out, result)
    _print(console or Console(), result, out)
    return result


def _print(console: Console, result: dict, out: Path) -> None:
    c = result["config"]
    t = Table(title=f"dispatch + combine, {c['tokens']} tokens x {c['hidden']} bf16, top-{c['top_k']}, "
                    f"{c['experts']} experts over {c['world']} ranks ({c['device']})")
    for col in ("rank", "rows off rank", "MB off rank", "dispatch p50 ms", "dispatch GB/s", "combine p50 ms",
                "combine GB/s"):
        t.add_column(col, justify="right")
    for r in result["ranks"]:
        t.add_row(str(r["rank"]), str(r["rows_off_rank"]), f"{r['bytes_off_rank'] / 1e6:.1f}",
                  f"{r['ms']['dispatch']['p50']:.3f}", f"{r['dispatch_GBps']:.1f}",
                  f"{r['ms']['combine']['p50']:.3f}", f"{r['combine_GBps']:.1f}")
    console.print(t)
    console.print(f"reference: DeepEP intranode 153 / 158 GB/s dispatch / combine (H800, NVLink). JSON: {out}")
