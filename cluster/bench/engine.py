"""`moecluster bench engine`: the engine's host-side cost per step, and prefix-cache hits on an
agent trace. Both drive the real `EngineCore`, `Scheduler` and `BlockManager`; only the forward
is replaced, by `ReplayRunner`.

1. Host time per step. N requests with prompts of U[prompt_min, prompt_max] random tokens are
   admitted and prefilled (untimed); then, with all N decoding, every `EngineCore.step()` is
   split into: `schedule` (Scheduler.schedule), `update` (Scheduler.update: computed tokens, block
   hashes), `tokens` (the engine's per-sampled-token work: append, incremental detokenization,
   stop checks, finishing, output deltas) and `prepare` (the real `ModelRunner.prepare`: flat
   batch and AttentionMetadata tensors, here on the CPU, so without the host-to-device copy).
   `scheduler` = schedule + update + tokens, the part with the 2 ms target; `total` adds prepare.
   `graph fill` is what a decode step replayed from a CUDA graph does on the host instead of
   prepare (`DecodeGraphs.fill`: the padded static inputs and block tables; 0 on mixed steps).
   The prefill-heavy row keeps the decodes running while prompts of U[long_min, long_max] tokens
   (one output token each) queue behind them, so every step also carries a prefill chunk that
   fills the 8192-token budget, and finished prompts' cached blocks get evicted.

2. Prefix-cache hit rate on a synthetic multi-turn agent trace (`make_trace`):
       shared    = system prompt (system_tokens) + tool definitions (tool_tokens), every session
       session s = an opening user task of U[opening_min, opening_max] tokens
       turn t    = shared + opening_s + sum over i < t of (assistant_i + observation_s,i)
   assistant_i is what the engine generated in turn i (max_tokens tokens, ignore_eos) and
   observation_s,i a tool result or user message of U[obs_min, obs_max] tokens; every turn
   re-submits the whole growing context. Token ids are uniform over [2, vocab) from a seeded
   random.Random, so sessions share nothing by accident. Sessions run concurrently, closed loop:
   session s submits its first turn at step 2s; after a turn finishes, its next one comes after
   a tool latency of U{1..tool_latency} engine steps. Hit counts are the engine's own
   (`EngineCore.stats().prefix_hit_rate`, `BlockManager.stats()`); per turn, each sequence's
   `num_cached` (set by the block manager) at its first admission, so a recompute after a
   preemption does not count as a hit. `bound` is what a block-granular
   cache of unlimited size could hit: everything computed in the session's previous turn (or,
   for a first turn, the shared prefix once any request came before), in whole blocks.
   Runs: caching on with room for every session, caching off, and a cache of about a third of
   that, where LRU eviction of idle sessions' blocks shows.

Why a replay runner: the toy model's naive MLA prefill is quadratic and slow on a CPU (about 30 s
for one 8k prompt), while neither number depends on the forward. `model_check` runs a mini trace
through the real tiny model (build_engine) and through the replay runner with the same settings;
their prefix-cache counts must agree.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from time import perf_counter_ns

import torch
from rich.console import Console
from rich.table import Table

from moecluster.cluster.bench import machine_info, summarize_ns, write_json
from moecluster.workers.checkpoint.tiny import TinySpec, make_tiny
from moecluster.text.detokenizer import Decoder
from moecluster.workers.engine.block_manager import BlockManager
from moecluster.workers.engine.cuda_graphs import DecodeGraphs
from moecluster.workers.engine.engine_config import EngineConfig, build_engine
from moecluster.workers.engine.engine_core import EngineCore
from moecluster.workers.engine.kv_cache import allocate_kv_cache
from moecluster.workers.engine.model_runner import ModelRunner
from moecluster.workers.engine.sampler import SamplerOutput
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from moecluster.workers.engine.sequence import Sequence, SeqStatus

PARTS = ("schedule", "update", "tokens", "scheduler", "prepare", "total", "graph fill")
TARGET_MS = 2.0  # scheduler (schedule + update + tokens) per step at 256 running requests


@dataclass(frozen=True)
class EngineBenchConfig:
    requests: tuple[int, ...] = (64, 128, 256)
    steps: int = 300  # timed steps per case
    warmup: int = 10  # untimed decode steps before them
    block_size: int = 64
    max_num_batched_tokens: int = 8192
    prompt_min: int = 512
    prompt_max: int = 2048
    long_min: int = 4096  # prefill-heavy row: the queued prompts
    long_max: int = 8192
    sessions: int = 4
    turns: int = 20
    system_tokens: int = 3072
    tool_tokens: int = 1024
    opening_min: int = 200
    opening_max: int = 600
    obs_min: int = 100
    obs_max: int = 600
    max_tokens: int = 32  # assistant tokens per turn
    tool_latency: int = 4  # steps, at most
    small_cache_fraction: float = 1 / 3
    seed: int = 0
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.requests or min(self.requests) <= 0:
            raise ValueError(f"requests must be positive counts, got {self.requests}")
        positive = ("steps", "block_size", "max_num_batched_tokens", "sessions", "turns", "max_tokens", "tool_latency")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for lo, hi in (("prompt_min", "prompt_max"), ("long_min", "long_max"), ("opening_min", "opening_max"),
                       ("obs_min", "obs_max")):
            if not 0 < getattr(self, lo) <= getattr(self, hi):
                raise ValueError(f"need 0 < {lo} <= {hi}, got {getattr(self, lo)}, {getattr(self, hi)}")
        if not 0 < self.small_cache_fraction < 1:
            raise ValueError(f"small_cache_fraction must be in (0, 1), got {self.small_cache_fraction}")

    @classmethod
    def quick_sizes(cls) -> EngineBenchConfig:
        return cls(requests=(8, 16), steps=20, warmup=2, long_min=1024, long_max=4096, sessions=2, turns=6,
                   system_tokens=1024, tool_tokens=256, quick=True)


# ---- the engine with the forward replaced ---------------------------------------------------
class ReplayRunner:
    """Stands in for ModelRunner (same `execute` contract, no forward): builds the batch with the
    real `ModelRunner.prepare` when given one, timing it, and samples seeded random tokens."""

    def __init__(self, vocab_size: int, prepare: ModelRunner | None = None, seed: int = 0,
                 graphs: DecodeGraphs | None = None) -> None:
        self.vocab_size, self.runner, self.graphs = vocab_size, prepare, graphs
        self.gen = torch.Generator().manual_seed(seed)
        self.prepare_ns = self.execute_ns = self.fill_ns = 0

    def replays(self, sched: SchedulerOutput, graph_size: int | None = None) -> bool:
        return False  # the engine reads every step's samples before the next (no asynchronous scheduling)

    def execute(self, sched: SchedulerOutput, graph_size: int | None = None, prev: object = None) -> SamplerOutput:
        del graph_size, prev  # no model, no graphs: the host's share of a step only
        start = perf_counter_ns()
        if self.runner is not None:
            self.runner.prepare(sched.scheduled)
        self.prepare_ns = perf_counter_ns() - start
        self.fill_ns = 0
        if self.graphs is not None and self.graphs.can_run(sched.scheduled):  # what a GPU replay does instead
            t = perf_counter_ns()
            self.graphs.fill(sched.scheduled, self.graphs.size_for(len(sched.scheduled)))
            self.fill_ns = perf_counter_ns() - t
        n = len(sched.samplers)
        tokens = torch.randint(2, self.vocab_size, (n,), generator=self.gen)
        out = SamplerOutput(tokens, torch.zeros(n), torch.ones(n, dtype=torch.int64), None, None)
        self.execute_ns = perf_counter_ns() - start
        return out


class TimedScheduler(Scheduler):
    """The real scheduler, recording the host time of its per-step calls (update_ns: advancing
    the computed counts and committing the filled blocks)."""

    schedule_ns = update_ns = num_tokens = 0

    def schedule(self) -> SchedulerOutput:
        start = perf_counter_ns()
        out = super().schedule()
        self.schedule_ns, self.num_tokens = perf_counter_ns() - start, out.num_tokens
        return out

    def advance(self, out: SchedulerOutput) -> list[tuple[Sequence, int]]:
        start = perf_counter_ns()
        computed = super().advance(out)
        self.update_ns = perf_counter_ns() - start
        return computed

    def commit(self, computed: list[tuple[Sequence, int]]) -> None:
        start = perf_counter_ns()
        super().commit(computed)
        self.update_ns += perf_counter_ns() - start


def replay_engine(sched_cfg: SchedulerConfig, blocks: BlockManager, decoder: Decoder, vocab_size: int,
                  prepare: ModelRunner | None = None, seed: int = 0, graphs: DecodeGraphs | None = None) -> EngineCore:
    runner = ReplayRunner(vocab_size, prepare, seed, graphs)
    return EngineCore(runner, TimedScheduler(sched_cfg, blocks), decoder, eos_token_ids=())  # type: ignore[arg-type]


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(2, vocab) for _ in range(n)]


# ---- 1. host time per step -------------------------------------------------------------------
def bench_steps(cfg: EngineBenchConfig, decodes: int, prefill_heavy: bool, decoder: Decoder,
                prepare: ModelRunner) -> dict:
    rng, vocab, bs = random.Random(cfg.seed), prepare.vocab_size, cfg.block_size
    prefill_steps = -(-decodes * cfg.prompt_max // cfg.max_num_batched_tokens) + 1
    max_len = max(cfg.prompt_max + prefill_steps + cfg.warmup + cfg.steps + 8, cfg.long_max + 2)
    num_blocks = decodes * -(-max_len // bs) + 4 * -(-cfg.long_max // bs)
    sched_cfg = SchedulerConfig(max_len + 1, decodes + 4, cfg.max_num_batched_tokens)
    model = prepare.model
    graphs = DecodeGraphs(model, allocate_kv_cache(model.cfg, 1, bs, model.dtype, "cpu"), bs, decodes + 4, max_len + 1,
                          scratch_block=0, capture=False)  # only its host fill is timed: the cache is never read
    engine = replay_engine(sched_cfg, BlockManager(num_blocks, bs), decoder, vocab, prepare, cfg.seed, graphs)
    scheduler, runner = engine.scheduler, engine.runner
    assert isinstance(scheduler, TimedScheduler) and isinstance(runner, ReplayRunner)
    decode = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    for i in range(decodes):
        engine.add_request(f"d{i}", _ids(rng, rng.randint(cfg.prompt_min, cfg.prompt_max), vocab), decode)
    while scheduler.waiting or any(s.num_computed < s.prompt_len for s in scheduler.running):
        engine.step()
    for _ in range(cfg.warmup):
        engine.step()
    if len(scheduler.running) != decodes:
        raise RuntimeError(f"expected {decodes} running decodes, have {len(scheduler.running)}")
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    long_prompts = iter(range(1 << 30))
    samples: dict[str, list[int]] = {p: [] for p in PARTS}
    tokens = seqs = 0
    for _ in range(cfg.steps):
        while prefill_heavy and len(scheduler.waiting) < 2:  # untimed: arrivals are not step work
            engine.add_request(f"p{next(long_prompts)}", _ids(rng, rng.randint(cfg.long_min, cfg.long_max), vocab), one)
        start = perf_counter_ns()
        engine.step()
        step = perf_counter_ns() - start
        part = {"schedule": scheduler.schedule_ns, "update": scheduler.update_ns, "prepare": runner.prepare_ns}
        part["tokens"] = step - scheduler.schedule_ns - scheduler.update_ns - runner.execute_ns
        part["scheduler"] = part["schedule"] + part["update"] + part["tokens"]
        part["total"] = part["scheduler"] + part["prepare"]
        part["graph fill"] = runner.fill_ns  # decode-only steps on a GPU: instead of prepare (0 when mixed)
        for name, ns in part.items():
            samples[name].append(ns)
        tokens += scheduler.num_tokens
        seqs += len(scheduler.running)
    parts = {name: summarize_ns(v) for name, v in samples.items()}
    return {
        "case": "prefill-heavy" if prefill_heavy else "decode",
        "running": decodes,
        "steps": cfg.steps,
        "tokens_per_step": tokens / cfg.steps,
        "running_per_step": seqs / cfg.steps,
        "parts_ms": parts,
        "scheduler_within_target": parts["scheduler"]["p99"] < TARGET_MS,
        "evictions": engine.blocks.stats().evictions,
    }


# ---- 2. prefix cache on an agent trace --------------------------------------------------------
@dataclass(frozen=True)
class AgentTrace:
    shared: list[int]  # system prompt + tool definitions
    openings: list[list[int]]  # per session
    observations: list[list[list[int]]]  # per session, per turn: appended after the assistant output
    max_tokens: int
    tool_latency: int

    @property
    def max_context(self) -> int:
        """The longest prompt any turn can submit."""
        return len(self.shared) + max(
            len(o) + sum(len(x) + self.max_tokens for x in obs[:-1]) for o, obs in zip(self.openings, self.observations)
        )


def make_trace(cfg: EngineBenchConfig, vocab: int, **sizes: int) -> AgentTrace:
    c = replace(cfg, **sizes)
    rng = random.Random(c.seed + 1)
    shared = _ids(rng, c.system_tokens, vocab) + _ids(rng, c.tool_tokens, vocab)
    openings = [_ids(rng, rng.randint(c.opening_min, c.opening_max), vocab) for _ in range(c.sessions)]
    obs = [[_ids(rng, rng.randint(c.obs_min, c.obs_max), vocab) for _ in range(c.turns)] for _ in range(c.sessions)]
    return AgentTrace(shared, openings, obs, c.max_tokens, c.tool_latency)


@dataclass
class _Session:
    index: int
    context: list[int]
    turn: int = 0
    ready_at: int | None = 0  # engine step at which the next turn is submitted; None: in flight
    computed: int = 0  # tokens of context computed by the previous turn
    rows: list[dict] = field(default_factory=list)


def run_trace(engine: EngineCore, trace: AgentTrace, block_size: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    sessions = [_Session(i, trace.shared + o, ready_at=2 * i) for i, o in enumerate(trace.openings)]
    turns = len(trace.observations[0])
    params = SamplingParams(temperature=0.0, max_tokens=trace.max_tokens, ignore_eos=True)
    inflight: dict[str, tuple[_Session, Sequence]] = {}
    step = submitted = 0
    while inflight or any(s.turn < turns for s in sessions):
        for i, s in enumerate(sessions):
            if s.turn < turns and s.ready_at is not None and s.ready_at <= step:
                rid = f"s{i}t{s.turn}"
                engine.add_request(rid, s.context, params)
                inflight[rid] = (s, engine.scheduler.waiting[-1])  # the sequence just queued
                reusable = s.computed if s.turn else (len(trace.shared) if submitted else 0)
                bound = min(reusable // block_size, (len(s.context) - 1) // block_size) * block_size
                s.rows.append({"turn": s.turn, "prompt": len(s.context), "bound": bound})
                s.ready_at, submitted = None, submitted + 1
        outputs = engine.step()
        for s, seq in inflight.values():  # admitted this step: what the prefix cache gave it
            if seq.status is not SeqStatus.WAITING and "cached" not in s.rows[-1]:
                s.rows[-1]["cached"] = seq.num_cached
        for out in outputs:
            if not out.finished:
                continue
            s, seq = inflight.pop(out.request_id)
            s.computed = len(seq.token_ids) - 1  # the last sampled token is never computed
            s.context = seq.token_ids + trace.observations[s.index][s.turn]
            s.turn += 1
            s.ready_at = step + 1 + rng.randrange(trace.tool_latency)
        step += 1
    rows = [r for s in sessions for r in s.rows]
    per_turn = []
    for t in range(turns):
        rs = [r for r in rows if r["turn"] == t]
        prompt = sum(r["prompt"] for r in rs)
        per_turn.append({
            "turn": t, "prompt_tokens": prompt, "mean_prompt": prompt / len(rs),
            "hit_rate": sum(r["cached"] for r in rs) / prompt, "bound": sum(r["bound"] for r in rs) / prompt,
        })
    stats, cache = engine.stats(), engine.blocks.stats()
    prompt = sum(r["prompt"] for r in rows)
    return {
        "num_blocks": cache.num_blocks,
        "capacity_tokens": engine.blocks.capacity_tokens,
        "prefix_caching": engine.blocks.enable_prefix_caching,
        "hit_rate": stats.prefix_hit_rate,
        "request_hit_rate": sum(r["cached"] for r in rows) / prompt,
        "bound": sum(r["bound"] for r in rows) / prompt,
        "prompt_tokens": prompt,
        "prefix_queries": cache.prefix_queries,
        "prefix_hits": cache.prefix_hits,
        "evictions": cache.evictions,
        "preemptions": stats.num_preemptions,
        "steps": stats.num_steps,
        "requests": len(rows),
        "per_turn": per_turn,
    }


def bench_prefix_cache(cfg: EngineBenchConfig, decoder: Decoder, vocab: int) -> dict:
    trace = make_trace(cfg, vocab)
    bs = cfg.block_size
    max_len = trace.max_context + trace.max_tokens + 1
    per_session = -(-max_len // bs)
    big = cfg.sessions * per_session + 8
    small = max(per_session + 1, int(big * cfg.small_cache_fraction))
    sched_cfg = SchedulerConfig(max_len + 1, 256, cfg.max_num_batched_tokens)
    runs = {}
    for name, blocks, caching in (("caching on", big, True), ("caching off", big, False), ("small cache", small, True)):
        engine = replay_engine(sched_cfg, BlockManager(blocks, bs, caching), decoder, vocab, seed=cfg.seed)
        runs[name] = run_trace(engine, trace, bs, cfg.seed)
    return {
        "trace": {
            "sessions": cfg.sessions, "turns": cfg.turns, "shared_tokens": len(trace.shared),
            "system_tokens": cfg.system_tokens, "tool_tokens": cfg.tool_tokens,
            "opening_tokens": [cfg.opening_min, cfg.opening_max], "observation_tokens": [cfg.obs_min, cfg.obs_max],
            "assistant_tokens": cfg.max_tokens, "tool_latency_steps": [1, cfg.tool_latency],
            "max_context": trace.max_context, "block_size": bs,
        },
        "runs": runs,
    }


def model_check(ckpt: Path, decoder: Decoder, cfg: EngineBenchConfig) -> dict:
    """A mini trace through the real tiny model and through the replay runner: same cache counts."""
    bs, blocks = 16, 128
    trace = make_trace(cfg, 1024, sessions=2, turns=4, system_tokens=96, tool_tokens=32, opening_min=16,
                       opening_max=32, obs_min=16, obs_max=48, max_tokens=4)
    real, _ = build_engine(EngineConfig(model=ckpt, dtype="float32", device="cpu", block_size=bs,
                                        num_kv_blocks=blocks, max_model_len=512))
    replay = replay_engine(real.scheduler.cfg, BlockManager(blocks, bs), decoder, real.runner.vocab_size)
    start = time.perf_counter()
    a = run_trace(real, trace, bs, cfg.seed)
    seconds = time.perf_counter() - start
    b = run_trace(replay, trace, bs, cfg.seed)
    keys = ("prefix_queries", "prefix_hits", "steps", "preemptions")
    return {"model": {k: a[k] for k in keys}, "replay": {k: b[k] for k in keys},
            "agree": all(a[k] == b[k] for k in keys), "model_seconds": seconds}


# ---- the whole benchmark ------------------------------------------------------------------------
def run(cfg: EngineBenchConfig, out: Path, console: Console | None = None) -> dict:
    console = console or Console(width=max(Console().width, 132))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moecluster-bench-") as tmp:
        ckpt = make_tiny(Path(tmp) / "tiny", TinySpec())
        real, tokenizer = build_engine(EngineConfig(model=ckpt, dtype="float32", device="cpu", num_kv_blocks=16))
        prepare = ModelRunner(real.runner.model, [], cfg.block_size)  # prepare() never touches the cache
        check = model_check(ckpt, tokenizer, cfg)
    cases = [bench_steps(cfg, n, False, tokenizer, prepare) for n in cfg.requests]
    cases.append(bench_steps(cfg, max(cfg.requests), True, tokenizer, prepare))
    prefix = bench_prefix_cache(cfg, tokenizer, prepare.vocab_size)
    prefix["model_check"] = check
    result = {
        "benchmark": "engine",
        "config": asdict(cfg),
        "machine": machine_info(),
        "scheduler": {"target_ms": TARGET_MS, "cases": cases},
        "prefix_cache": prefix,
        "wall_s": time.perf_counter() - start,
    }
    write_json(out, result)
    _print(console, result, out)
    return result


def _print(console: Console, result: dict, out: Path) -> None:
    t = Table(title=f"host time per engine step, ms (target: scheduler < {TARGET_MS:g} ms at 256 running)")
    for col in ("case", "running", "tokens/step", "part", "p50", "p99", "mean", ""):
        t.add_column(col, justify="left" if col in ("case", "part") else "right")
    for c in result["scheduler"]["cases"]:
        for i, part in enumerate(PARTS):
            s = c["parts_ms"][part]
            mark = ("ok" if c["scheduler_within_target"] else "over") if part == "scheduler" else ""
            head = (c["case"], str(c["running"]), f"{c['tokens_per_step']:.0f}") if i == 0 else ("", "", "")
            t.add_row(*head, part, f"{s['p50']:.3f}", f"{s['p99']:.3f}", f"{s['mean']:.3f}", mark,
                      end_section=i == len(PARTS) - 1)
    console.print(t)

    pc = result["prefix_cache"]
    tr, runs = pc["trace"], pc["runs"]
    s = Table(title=(f"prefix cache on an agent trace: {tr['sessions']} sessions x {tr['turns']} turns, "
                     f"{tr['shared_tokens']} shared tokens, block {tr['block_size']}"))
    for col in ("run", "blocks", "tokens", "hit rate", "per request", "bound", "hits / lookups", "prompt tokens",
                "evictions", "preempted", "steps"):
        s.add_column(col, justify="left" if col == "run" else "right")
    for name, r in runs.items():
        s.add_row(name, str(r["num_blocks"]), str(r["capacity_tokens"]), f"{r['hit_rate']:.3f}",
                  f"{r['request_hit_rate']:.3f}", f"{r['bound']:.3f}", f"{r['prefix_hits']} / {r['prefix_queries']}",
                  str(r["prompt_tokens"]), str(r["evictions"]), str(r["preemptions"]), str(r["steps"]))
    console.print(s)
    console.print("hit rate: EngineCore.stats().prefix_hit_rate, which counts a lookup every step a request is "
                  "refused admission; per request: each turn's cached tokens at its first admission / its "
                  "prompt tokens")

    p = Table(title="hit rate per turn index (all sessions)")
    for col in ("turn", "mean prompt", *runs, "bound"):
        p.add_column(col, justify="right")
    first = next(iter(runs.values()))["per_turn"]
    for i, row in enumerate(first):
        hits = (f"{r['per_turn'][i]['hit_rate']:.3f}" for r in runs.values())
        p.add_row(str(row["turn"]), f"{row['mean_prompt']:.0f}", *hits, f"{row['bound']:.3f}")
    console.print(p)

    mc = pc["model_check"]
    verdict = "agree" if mc["agree"] else "DISAGREE"
    console.print(f"model check (mini trace, real tiny model vs replay runner): {verdict}; "
                  f"model {mc['model']}, replay {mc['replay']}")
    console.print(f"wrote {out} ({result['wall_s']:.1f} s)")
