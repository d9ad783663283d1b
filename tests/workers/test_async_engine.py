"""The asynchronous engine interface: submit, stream, abort, stats, failure delivery."""

from __future__ import annotations

import asyncio
import time

import pytest

from moecluster import SamplingParams
from moecluster.workers.engine.async_engine import AsyncEngine, EngineDead
from moecluster.workers.engine.engine_config import EngineConfig, build_engine
from moecluster.workers.engine.engine_core import RequestError


@pytest.fixture
def engine(tiny_checkpoint):
    core, _ = build_engine(EngineConfig(model=tiny_checkpoint(num_layers=2), dtype="float32", device="cpu",
                                        block_size=16, num_kv_blocks=16))
    eng = AsyncEngine(core)
    yield eng
    eng.shutdown()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
    tokens: list[int] = []
    async for delta in engine.generate(rid, prompt, params):
        tokens += delta.outputs[0].token_ids
    return tokens


def test_concurrent_streams_match_sequential(engine: AsyncEngine) -> None:
    prompts = [[(7 * i + j) % 900 + 2 for j in range(5 + 3 * i)] for i in range(12)]

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        together = await asyncio.gather(*(collect(engine, f"c{i}", p, greedy(8)) for i, p in enumerate(prompts)))
        alone = [await collect(engine, f"s{i}", p, greedy(8)) for i, p in enumerate(prompts)]
        return list(together), alone

    together, alone = asyncio.run(run())
    assert together == alone and all(len(t) == 8 for t in together)


def test_stream_deltas_arrive_one_token_at_a_time(engine: AsyncEngine) -> None:
    async def run() -> list:
        return [d async for d in engine.generate("r", [5, 6, 7], greedy(5))]

    deltas = asyncio.run(run())
    assert [len(d.outputs[0].token_ids) for d in deltas] == [1] * 5
    assert [d.finished for d in deltas] == [False] * 4 + [True]
    assert deltas[-1].outputs[0].finish_reason == "length"


def test_consumer_that_stops_aborts_and_frees_blocks(engine: AsyncEngine) -> None:
    async def run() -> None:
        stream = engine.generate("r", list(range(2, 60)), greedy(150))
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(run())
    deadline = time.time() + 10
    while time.time() < deadline and (engine.stats().num_running or engine.stats().kv_usage):
        time.sleep(0.01)
    assert engine.stats().num_running == 0 and engine.stats().kv_usage == 0.0


def test_explicit_abort_ends_the_stream(engine: AsyncEngine) -> None:
    async def run() -> list:
        out = []
        async for delta in engine.generate("r", list(range(2, 40)), greedy(200)):
            out.append(delta)
            if len(out) == 3:
                engine.abort("r")
        return out

    out = asyncio.run(run())
    assert out[-1].finished and out[-1].outputs[-1].finish_reason == "abort"
    assert len(out) < 200


def test_bad_requests_fail_in_the_caller(engine: AsyncEngine) -> None:
    with pytest.raises(RequestError, match="empty"):
        engine.submit("x", [], greedy(2), lambda _: None)
    with pytest.raises(RequestError, match="KV cache"):
        engine.submit("x", [3] * 100, greedy(1000), lambda _: None)
    assert asyncio.run(collect(engine, "ok", [3, 4], greedy(2)))  # still serving


def test_duplicate_request_id_fails_only_that_request(engine: AsyncEngine) -> None:
    async def run() -> None:
        # the duplicate arrives once the first has produced a token and has 199 to go (a fixed
        # sleep raced a fast machine: the first could finish before the duplicate came)
        first = engine.generate("dup", list(range(2, 30)), greedy(200))
        tokens = list((await anext(first)).outputs[0].token_ids)
        with pytest.raises(RequestError, match="already running"):
            await collect(engine, "dup", [3, 4], greedy(2))
        async for delta in first:
            tokens += delta.outputs[0].token_ids
        assert len(tokens) == 200

    asyncio.run(run())


def test_a_failing_step_reaches_every_stream(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> list:
        raise RuntimeError("device fell over")

    monkeypatch.setattr(engine.core, "step", boom)
    with pytest.raises(RuntimeError, match="device fell over"):
        asyncio.run(collect(engine, "r", [3, 4, 5], greedy(3)))
    with pytest.raises(EngineDead):
        engine.submit("again", [3], greedy(1), lambda _: None)
