"""`moecluster bench router`: what the router adds between an engine and its clients.

The router (gRPC server, request service, placement, streaming) runs over `FakeEngine`, which
emits one token per open request every `step_s` and records when it emitted each delta. Clients
run in a separate process (grpc.aio, `concurrency` streams kept open, closed loop; output lengths
spread over [tokens/2, 3 tokens/2] so requests do not finish and arrive in synchronized waves) and record when
each delta arrived. Added latency per token = arrival of the message carrying it - its emission (both `time.perf_counter`, the
system-wide monotonic clock on Linux). Reported: p50 / p99 of that over all deltas and over
first deltas, requests/s and tokens/s completed, and the CPU share of the server process (router + fake engine).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from moecluster.cluster.bench.fake_engine import FakeEngine
from moecluster.cluster.stats import percentile
from moecluster.router.requests.server import RouterConfig, RouterServer


@dataclass(frozen=True)
class RouterBenchConfig:
    concurrency: int = 256
    requests: int = 2048
    tokens: int = 32
    step_s: float = 0.02
    prompt_words: int = 64


def _client(port: int, cfg: RouterBenchConfig, out: mp.Queue) -> None:
    import grpc

    from moecluster.proto.v1 import generation_pb2 as pb
    from moecluster.proto.v1 import generation_pb2_grpc as pb_grpc

    async def run() -> dict[str, list[float]]:
        arrivals: dict[str, list[float]] = {}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            next_id = iter(range(cfg.requests))

            async def worker() -> None:
                for i in next_id:
                    rid = f"bench-{i}"
                    text = " ".join(f"w{(i * 7 + j) % 500}" for j in range(cfg.prompt_words))
                    tokens = cfg.tokens // 2 + (i * 37) % (cfg.tokens + 1)  # U-like over [t/2, 3t/2]: no lockstep waves
                    request = pb.GenerateRequest(text=text, request_id=rid,
                                                 sampling=pb.SamplingParams(max_tokens=tokens))
                    times = arrivals[rid] = []
                    async for r in stub.Generate(request):  # a message may carry several tokens
                        now = time.perf_counter()
                        times.extend([now] * sum(len(c.token_ids) for c in r.choices))

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
            arrivals["__elapsed__"] = [time.perf_counter() - start]
        return arrivals

    out.put(asyncio.run(run()))


def _pct(values: list[float], q: float) -> float:
    p = percentile(values, q)
    return float("nan") if p is None else p


def run(cfg: RouterBenchConfig, tokenizer_dir: Path) -> dict:
    from moecluster.text.tokenizer import load_tokenizer

    engine = FakeEngine(vocab_size=500, step_s=cfg.step_s, max_model_len=4096)
    server = RouterServer(engine, load_tokenizer(tokenizer_dir),
                          RouterConfig(grpc_port=0, http_port=0, policy="cache_aware", max_queue=cfg.concurrency * 2))
    server.start()
    try:
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()
        cpu0 = time.process_time()
        proc = ctx.Process(target=_client, args=(server.grpc_port, cfg, out))
        proc.start()
        arrivals = out.get(timeout=600)
        proc.join(30)
        router_cpu = time.process_time() - cpu0
    finally:
        server.stop()
        engine.close()
    elapsed = arrivals.pop("__elapsed__")[0]
    added, first = [], []
    for rid, times in arrivals.items():
        emitted = engine.emitted.get(rid, [])
        gaps = [(a - e) * 1e3 for a, e in zip(times, emitted)]
        added += gaps
        if gaps:
            first.append(gaps[0])
    return {
        "config": asdict(cfg),
        "tokens": len(added),
        "added_ms_p50": _pct(added, 0.5), "added_ms_p99": _pct(added, 0.99),
        "first_delta_added_ms_p50": _pct(first, 0.5), "first_delta_added_ms_p99": _pct(first, 0.99),
        "requests_per_s": len(arrivals) / elapsed, "tokens_per_s": len(added) / elapsed,
        "server_cpu_share": router_cpu / elapsed,
        "elapsed_s": elapsed,
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = result["config"]
    table = Table(title=f"router overhead: {c['concurrency']} streams x {c['tokens']} tokens, engine step {c['step_s'] * 1e3:.0f} ms")
    for col in ("tokens", "added p50 ms", "added p99 ms", "first p50 ms", "first p99 ms", "req/s", "tok/s", "server CPU"):
        table.add_column(col, justify="right")
    table.add_row(str(result["tokens"]), f"{result['added_ms_p50']:.3f}", f"{result['added_ms_p99']:.3f}",
                  f"{result['first_delta_added_ms_p50']:.3f}", f"{result['first_delta_added_ms_p99']:.3f}",
                  f"{result['requests_per_s']:.0f}", f"{result['tokens_per_s']:.0f}", f"{result['server_cpu_share']:.0%}")
    Console().print(table)


def main(cfg: RouterBenchConfig, tokenizer_dir: Path, json_out: Path | None) -> dict:
    result = run(cfg, tokenizer_dir)
    print_table(result)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
    return result
