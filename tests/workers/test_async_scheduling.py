"""Asynchronous scheduling on the CPU (decode graphs without capture): a decode step is launched
before the host reads the samples of the step before it. The streams must equal the synchronous
engine's under everything that touches a step in flight: admissions mid-run, stop tokens the host
learns a step late, aborts, preemption, seeded sampling with logprobs, n > 1, prefix caching."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from moecluster.text.tokenizer import load_tokenizer
from moecluster.workers.engine.cuda_graphs import DecodeGraphs
from moecluster.workers.engine.engine_config import EngineConfig, build_core
from moecluster.workers.engine import engine_core
from moecluster.workers.engine.engine_core import PLACEHOLDER, EngineCore
from moecluster.workers.engine.kv_cache import allocate_kv_cache
from moecluster.workers.engine.model_runner import ModelRunner
from moecluster.workers.engine.outputs import RequestOutput
from moecluster.workers.engine.sampling_params import SamplingParams

BLOCK = 16


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint(num_layers=2)


def _core(ckpt: Path, async_scheduling: bool, num_blocks: int = 48, max_batch: int = 8,
          prefix_caching: bool = False) -> EngineCore:
    """An fp32 CPU engine whose decode steps go through DecodeGraphs (no capture), as on a GPU."""
    cfg = EngineConfig(model=ckpt, dtype="float32", device="cpu", block_size=BLOCK, num_kv_blocks=num_blocks,
                       enable_prefix_caching=prefix_caching, async_scheduling=async_scheduling)
    core = build_core(cfg, load_tokenizer(ckpt))
    model = core.runner.model
    kv = allocate_kv_cache(model.cfg, num_blocks + 1, BLOCK, torch.float32, "cpu")
    graphs = DecodeGraphs(model, kv, BLOCK, max_batch, 512, scratch_block=num_blocks, capture=False)
    core.runner = ModelRunner(model, kv, BLOCK, graphs)
    return core


def _collect(outs: list[RequestOutput], into: dict[str, dict]) -> None:
    for o in outs:
        req = into.setdefault(o.request_id, {"finished": False})
        assert not req["finished"], f"{o.request_id} streamed after it finished"
        for c in o.outputs:
            assert PLACEHOLDER not in c.token_ids
            got = req.setdefault(c.index, {"ids": [], "text": "", "lp": [], "reason": None})
            got["ids"] += c.token_ids
            got["text"] += c.text
            got["lp"] += [round(v.logprob, 4) for e in (c.logprobs or []) for v in e.values()]
            got["reason"] = c.finish_reason or got["reason"]
        req["finished"] = o.finished


def _drive(core: EngineCore, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]],
           aborts: dict[int, str] | None = None) -> dict[str, dict]:
    """Step the engine; at step k add arrivals[k] and abort aborts[k] first."""
    out: dict[str, dict] = {}
    step = 0
    while core.has_unfinished() or any(k >= step for k in arrivals):
        for rid, prompt, params in arrivals.get(step, []):
            core.add_request(rid, prompt, params)
        if aborts and step in aborts:
            done = core.abort(aborts[step])
            if done is not None:
                _collect([done], out)
        _collect(core.step(), out)
        step += 1
        assert step < 500
    return out


def _workload(seed: int) -> tuple[dict, dict]:
    rng = random.Random(seed)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    arrivals: dict[int, list] = {}
    for i in range(7):
        prompt = [rng.randrange(2, 900) for _ in range(rng.randrange(3, 40))]
        kind = i % 4
        if kind == 0:
            params = greedy
        elif kind == 1:  # seeded sampling with logprobs: its own generator, so the same draws either way
            params = SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=10, logprobs=2, ignore_eos=True)
        elif kind == 2:  # stops on a token the host sees a step late
            params = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=list(range(2, 900, 3)))
        else:
            params = SamplingParams(temperature=0.7, seed=7 * i, n=2, max_tokens=8, ignore_eos=True)
        arrivals.setdefault(rng.choice([0, 0, 2, 5, 9]), []).append((f"r{i}", prompt, params))
    return arrivals, {6: "r1"}


def _assert_equal_but_aborted(got: dict, want: dict, full: dict, aborted: set[str]) -> None:
    """Streams equal the synchronous engine's (`want`), except aborted ones: the abort lands at
    another point of their progress (outputs come a step later, and an eager step can return
    two steps' outputs), so each is a prefix of its stream run without aborts (`full`), ending
    with "abort" unless it completed first."""
    assert got.keys() == want.keys()
    for rid in want:
        if rid not in aborted:
            assert got[rid] == want[rid], rid
            continue
        for index, g in got[rid].items():
            if index == "finished":
                continue
            whole = full[rid][index]
            assert whole["ids"][: len(g["ids"])] == g["ids"]
            allowed = {"abort"} if len(g["ids"]) < len(whole["ids"]) else {"abort", whole["reason"]}
            assert g["reason"] in allowed, (rid, g["reason"])


@pytest.mark.parametrize("seed", [0, 1])
def test_async_streams_equal_sync(ckpt: Path, seed: int) -> None:
    arrivals, aborts = _workload(seed)
    want = _drive(_core(ckpt, async_scheduling=False), arrivals, aborts)
    full = _drive(_core(ckpt, async_scheduling=False), arrivals)
    got = _drive(_core(ckpt, async_scheduling=True), arrivals, aborts)
    _assert_equal_but_aborted(got, want, full, set(aborts.values()))
    assert all(r["finished"] for r in got.values())
    assert any(s["reason"] == "stop" for r in got.values() for k, s in r.items() if k != "finished")


def test_async_under_preemption_and_prefix_cache(ckpt: Path) -> None:
    """A cache too small for every stream: sequences are preempted (some while a step is in flight)
    and recomputed through the prefix cache; the streams still equal the synchronous engine's."""
    rng = random.Random(3)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    arrivals = {0: [(f"r{i}", [rng.randrange(2, 900) for _ in range(20)], params) for i in range(6)]}
    sync = _core(ckpt, async_scheduling=False, num_blocks=14, prefix_caching=True)
    want = _drive(sync, arrivals)
    core = _core(ckpt, async_scheduling=True, num_blocks=14, prefix_caching=True)
    got = _drive(core, arrivals)
    assert got == want
    assert core.num_preemptions > 0 and sync.num_preemptions > 0
    assert core.blocks.stats().num_free_blocks == 14  # every block came back


def test_decode_steps_overlap(ckpt: Path) -> None:
    """With async scheduling the next decode step is launched before the previous one's samples
    are read: a step returns the outputs of the step before it, and the last comes from `flush`."""
    core = _core(ckpt, async_scheduling=True)
    events: list[str] = []
    runner_execute, finish = core.runner.execute, core._finish
    core.runner.execute = lambda *a: (events.append("launch"), runner_execute(*a))[1]  # type: ignore[method-assign]
    core._finish = lambda step: (events.append("read"), finish(step))[1]  # type: ignore[method-assign]
    core.add_request("a", list(range(2, 20)), SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert len(core.step()) == 1  # the prompt runs eagerly: its first token comes at once
    assert core.step() == []  # first decode: launched, not read
    assert len(core.step()) == 1  # second decode launched, then the first read
    assert events == ["launch", "read", "launch", "launch", "read"]
    outs = []
    while core.has_unfinished():
        outs += core.step()
    outs += core.flush()
    assert sum(len(o.outputs[0].token_ids) for o in outs) == 3 and outs[-1].finished
    assert events.count("launch") == events.count("read") == 5  # max_tokens 5: no step past the length limit


def test_sync_engine_never_holds_a_step(ckpt: Path) -> None:
    core = _core(ckpt, async_scheduling=False)
    core.add_request("a", list(range(2, 20)), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    n = 0
    while core.has_unfinished():
        n += sum(len(o.outputs[0].token_ids) for o in core.step())
        assert core._pending is None
    assert n == 4


def test_eager_steps_between_async_ones(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An expert-parallel group sometimes makes a rank's decode step eager (another rank prefills).
    Scheduled ahead of a step in flight, such a step first reads that step's samples and drops the
    sequences they stopped (their blocks are gone). Here every other decode step is made eager
    that way, under streams that stop on tokens; the streams equal the synchronous engine's."""
    rng = random.Random(4)
    stops = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=list(range(2, 900, 4)))
    arrivals = {0: [(f"r{i}", [rng.randrange(2, 900) for _ in range(rng.randrange(3, 30))], stops) for i in range(8)]}
    want = _drive(_core(ckpt, async_scheduling=False), arrivals)
    core = _core(ckpt, async_scheduling=True)
    decided, replays = {}, core.runner.replays

    def alternate(sched, graph_size=None):  # noqa: ANN001, ANN202 - one decision per step
        if id(sched) not in decided:  # (the step is kept with its decision: its id is not reused)
            decided[id(sched)] = (sched, replays(sched, graph_size) and len(decided) % 2 == 0)
        return decided[id(sched)][1]

    dropped = []
    without_finished = engine_core._without_finished

    def counting(sched):  # noqa: ANN001, ANN202
        dropped.append(sum(s.seq.finished for s in sched.scheduled))
        return without_finished(sched)

    monkeypatch.setattr(engine_core, "_without_finished", counting)
    core.runner.replays = alternate  # type: ignore[method-assign]
    assert _drive(core, arrivals) == want
    assert sum(dropped) > 0  # sequences that stopped in the step in flight were dropped from an eager one


def test_abort_mid_decode(ckpt: Path) -> None:
    """Aborted while a decode step is in flight: the stream ends with "abort" and holds what the
    synchronous engine streamed, less at most the token of that step."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    arrivals = {0: [("a", list(range(2, 30)), params), ("b", list(range(40, 52)), params)]}
    want = _drive(_core(ckpt, async_scheduling=False), arrivals, {5: "a"})
    full = _drive(_core(ckpt, async_scheduling=False), arrivals)
    got = _drive(_core(ckpt, async_scheduling=True), arrivals, {5: "a"})
    _assert_equal_but_aborted(got, want, full, {"a"})
    assert got["a"][0]["reason"] == "abort" and len(want["a"][0]["ids"]) - len(got["a"][0]["ids"]) in (0, 1)


def test_overlap_continues_while_requests_wait(ckpt: Path) -> None:
    """A full engine (max_num_seqs) with requests queued keeps launching decode steps ahead of
    reading the previous ones; admissions, which run eagerly, read the step in flight first."""
    cfg_core = _core(ckpt, async_scheduling=True)
    cfg_core.scheduler.cfg = dataclasses.replace(cfg_core.scheduler.cfg, max_num_seqs=2)
    sync = _core(ckpt, async_scheduling=False)
    sync.scheduler.cfg = dataclasses.replace(sync.scheduler.cfg, max_num_seqs=2)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    arrivals = {0: [(f"r{i}", [3 + i, 50 + i, 700 - i, 9], params) for i in range(4)]}
    held_while_waiting = []
    step = cfg_core.step

    def spy() -> list[RequestOutput]:
        outs = step()
        held_while_waiting.append(cfg_core._pending is not None and bool(cfg_core.scheduler.waiting))
        return outs

    cfg_core.step = spy  # type: ignore[method-assign]
    assert _drive(cfg_core, arrivals) == _drive(sync, arrivals)
    assert sum(held_while_waiting) >= 4  # the first pair's decode steps overlapped


def test_without_finished_keeps_forks_on_renumbered_rows() -> None:
    """The eager fallback drops stopped sequences' rows and renumbers the rest; siblings forked
    from a surviving row follow it."""
    from types import SimpleNamespace

    from moecluster.workers.engine.scheduler import ScheduledSeq, SchedulerOutput

    done, a, b, sib = (SimpleNamespace(finished=f) for f in (True, False, False, False))
    sched = SchedulerOutput([ScheduledSeq(done, 1, True), ScheduledSeq(a, 1, True), ScheduledSeq(b, 3, True)],
                            [(done, 0), (a, 1), (b, 2), (sib, 2)], [(4, 9)], [], [sib])
    out = engine_core._without_finished(sched)  # type: ignore[arg-type]
    assert [s.seq for s in out.scheduled] == [a, b]
    assert out.samplers == [(a, 0), (b, 1), (sib, 1)] and out.block_copies == [(4, 9)] and out.forked == [sib]
