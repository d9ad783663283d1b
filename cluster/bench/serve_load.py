"""The client side of `moecluster bench serve`: closed-loop gRPC streams against a served router.

One level = `requests` requests of `input_len` random prompt token ids and exactly `output_len`
new tokens (ignore_eos), `concurrency` of them open at a time. The clients run in processes of
their own (grpc.aio), so they share no interpreter with the router they measure, and record for
each request when it was sent, when each token arrived and what the server reported. The streams
are spread over several client processes (about STREAMS_PER_CLIENT each): one Python process
reading every stream of a high-concurrency level becomes the bottleneck itself (tokens of a
stream read together, as if the server had sent them together).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoadLevel:
    input_len: int
    output_len: int
    concurrency: int
    requests: int
    vocab_size: int
    seed: int = 0
    timeout_s: float = 1800.0
    clients: int = 0  # client processes; 0: one per STREAMS_PER_CLIENT streams, at most the CPUs less one


STREAMS_PER_CLIENT = 32


def client_processes(level: LoadLevel) -> int:
    if level.clients:
        return max(1, min(level.clients, level.concurrency))
    cpus = max(1, (os.cpu_count() or 1) - 1)
    return max(1, min(-(-level.concurrency // STREAMS_PER_CLIENT), cpus, level.concurrency))


@dataclass
class RequestRecord:
    sent: float  # time.perf_counter() of the client process (CLOCK_MONOTONIC, shared across processes)
    token_times: list[float] = field(default_factory=list)  # arrival of each new token
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


def prompt_ids(level: LoadLevel, index: int) -> list[int]:
    """A random prompt per request (no shared prefixes: the prefix cache does not help)."""
    rng = random.Random(level.seed * 1_000_003 + index)
    return [rng.randrange(level.vocab_size) for _ in range(level.input_len)]


def stream_slots(level: LoadLevel, part: int, parts: int) -> range:
    """The level's stream slots (0 .. concurrency-1) that client `part` of `parts` runs; slot s
    sends requests s, s + concurrency, s + 2 * concurrency, ... one after another."""
    return range(part * level.concurrency // parts, (part + 1) * level.concurrency // parts)


def _client(target: str, level: LoadLevel, part: int, parts: int, out: mp.Queue, ready: Any) -> None:
    """This part's stream slots of the level; every client starts its clock after all are connected."""
    import grpc

    from moecluster.proto.v1 import generation_pb2 as pb
    from moecluster.proto.v1 import generation_pb2_grpc as pb_grpc

    async def run() -> tuple[list[RequestRecord], float, float]:
        records: list[RequestRecord] = []
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            stub = pb_grpc.GenerationStub(channel)
            sampling = pb.SamplingParams(max_tokens=level.output_len, ignore_eos=True, temperature=0.0)

            async def worker(slot: int) -> None:
                for i in range(slot, level.requests, level.concurrency):
                    request = pb.GenerateRequest(request_id=f"bench-{level.seed}-{i}", sampling=sampling)
                    request.token_ids.ids.extend(prompt_ids(level, i))
                    record = RequestRecord(sent=time.perf_counter())
                    records.append(record)
                    try:
                        async for r in stub.Generate(request, timeout=level.timeout_s):
                            now = time.perf_counter()
                            record.token_times.extend([now] * sum(len(c.token_ids) for c in r.choices))
                            if r.HasField("usage"):
                                record.prompt_tokens = r.usage.prompt_tokens
                                record.output_tokens = r.usage.completion_tokens
                    except grpc.aio.AioRpcError as e:
                        record.error = f"{e.code().name}: {e.details()}"

            await channel.channel_ready()
            await asyncio.get_running_loop().run_in_executor(None, ready.wait, 300)  # all clients connected
            start = time.perf_counter()
            await asyncio.gather(*(worker(slot) for slot in stream_slots(level, part, parts)))
            return records, start, time.perf_counter()

    try:
        out.put(asyncio.run(run()))
    except BaseException as e:  # noqa: BLE001 - the driver must hear it, not wait for a result
        out.put(RuntimeError(f"load client {part} of {parts} failed: {e!r}"))
        raise


def run_level(target: str, level: LoadLevel) -> tuple[list[RequestRecord], float, float]:
    """Run one level from fresh client processes; returns (records, start, end): the records of
    all of them, from the first start to the last end (perf_counter is shared across processes)."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    parts = client_processes(level)
    ready = ctx.Barrier(parts)
    procs = [ctx.Process(target=_client, args=(target, level, p, parts, out, ready), daemon=True) for p in range(parts)]
    for proc in procs:
        proc.start()
    try:
        results = [out.get(timeout=level.timeout_s + 60) for _ in procs]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    records = [r for rs, _, _ in results for r in rs]
    return records, min(r[1] for r in results), max(r[2] for r in results)
