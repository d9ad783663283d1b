"""`moecluster bench serve`: the whole served stack under load, against transformers and the roofline.

1. The stack: `serve.start` on an embedded Ray (rank actors on the local GPUs, the router's gRPC
   front end), a checkpoint directory or a full-width slice written by `make_slice` and served
   with random weights. Optional prefill pool (disaggregated serving).
2. Load: for each request mix (input / output tokens) and each concurrency, closed-loop gRPC
   streams from separate client processes (`serve_load.py`, about 32 streams each); per level: input and output tok/s
   per GPU over the level's wall time, TTFT and ITL p50 / p99, and the decode rate concurrency /
   ITL p50 per GPU (tokens per second while every stream decodes). A prefill level per mix
   (max_tokens 1) gives prefill tok/s per GPU. A short warm-up level runs first (Triton compiles).
3. After the stack is down, on the same GPU: the copy bandwidth; the decode-step roofline per
   level (weights + cache bytes per rank, `roofline.py`); one MoE layer timed on a decode batch
   against its own roofline; transformers' eager `DeepseekV3ForCausalLM` decode rate on the same
   shapes (`hf_baseline.py`).

Everything lands in one JSON (written after every level, so a crash keeps what was measured) and
a table; `serve_plot.py` draws the PNG.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moecluster.cluster.bench import write_json
from moecluster.cluster.bench.serve_load import LoadLevel, RequestRecord, client_processes, run_level
from moecluster.cluster.stats import percentile

log = logging.getLogger(__name__)

GPUS_PER_NODE = 8


@dataclass(frozen=True)
class ServeBenchConfig:
    model: Path | None = None  # a checkpoint directory; None: a slice of `preset`
    preset: str = "deepseek-v3"
    layers: int = 4
    dense_layers: int = 1
    routed_experts: int | None = None  # a slice with fewer experts: one EP rank's share (slice_model.py)
    load_format: str = "random"
    device: str = "cuda"
    dtype: str = "bfloat16"
    ep: int = 1
    replicas: int = 1
    prefill_ep: int | None = None  # a prefill pool of one replica of this EP size (disaggregated)
    mixes: tuple[tuple[int, int], ...] = ((2000, 100),)
    concurrency: tuple[int, ...] = (1, 16, 64)
    waves: int = 2  # requests per level = concurrency * waves
    block_size: int = 64
    memory_fraction: float = 0.9
    max_num_batched_tokens: int = 8192
    warmup: bool = True
    warmup_streams: int | None = None  # the warm-up levels' streams (default: the largest level's)
    prefill_level: bool = True  # a prefill-only level (max_tokens 1) before each mix's levels
    baseline: bool = True
    baseline_concurrency: int = 64
    baseline_steps: int = 8
    roofline: bool = True
    cuda_graph_max_batch: int = 512  # 0: eager decode steps (capped at the largest concurrency)
    async_scheduling: bool = True
    decode_experts_w8a8: bool = True
    decode_linears_w8a8: bool = True
    client_procs: int = 0  # load-generator processes per level; 0: one per 32 streams (serve_load.py)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.routed_experts is not None and self.model is not None:
            raise ValueError("routed_experts shapes a slice of a preset; it does not apply to a checkpoint (model)")
        if self.warmup_streams is not None and self.warmup_streams < 1:
            raise ValueError(f"warmup_streams must be at least 1, got {self.warmup_streams}")

    @property
    def gpus(self) -> int:
        return self.ep * self.replicas + (self.prefill_ep or 0)


@dataclass
class ServeBenchResult:
    config: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    levels: list[dict[str, Any]] = field(default_factory=list)
    copy_gbs: float | None = None
    moe_layer: list[dict[str, Any]] = field(default_factory=list)
    baseline: dict[str, Any] | None = None
    kv_transfers: dict[str, int] = field(default_factory=dict)  # prefill -> decode handoffs by outcome
    kv_cache: dict[str, Any] = field(default_factory=dict)  # capacity per decode rank, sequences at long contexts
    startup_s: float | None = None  # Ray, actors, weights, cache and graph capture until the router serves
    warmup_s: float | None = None  # the warm-up levels (kernel compiles)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def summarize_level(records: list[RequestRecord], start: float, end: float, gpus: int, concurrency: int) -> dict[str, Any]:
    """Throughput and latency of one level from its request records (`concurrency` streams open at a time)."""
    ok = [r for r in records if r.error is None and r.token_times]
    ttft = [(r.token_times[0] - r.sent) * 1e3 for r in ok]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    steps = [x for x in itl if x > 0]  # tokens read together (a 0 gap) are not a step apart
    out_tokens = sum(len(r.token_times) for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    wall = max(end - start, 1e-9)
    itl_p50 = percentile(steps, 0.5)
    # time per output token of each request after its first ((last - first) / (tokens - 1), as vLLM's
    # benchmark reports TPOT): unlike the gaps, it holds when tokens reach the client merged
    tpot = [(r.token_times[-1] - r.token_times[0]) * 1e3 / (len(r.token_times) - 1) for r in ok if len(r.token_times) > 1]
    tpot_p50 = percentile(tpot, 0.5)
    streams = min(concurrency, len(ok))
    return {
        "requests": len(records), "errors": len(records) - len(ok),
        "error_examples": sorted({r.error for r in records if r.error})[:3],
        "wall_s": wall, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "input_tok_s_per_gpu": in_tokens / wall / gpus, "output_tok_s_per_gpu": out_tokens / wall / gpus,
        "ttft_ms_p50": percentile(ttft, 0.5), "ttft_ms_p99": percentile(ttft, 0.99),
        "itl_ms_p50": percentile(itl, 0.5), "itl_ms_p99": percentile(itl, 0.99),
        "step_ms_p50": itl_p50,
        "decode_tok_s_per_gpu": (streams / (itl_p50 * 1e-3) / gpus) if itl_p50 else None,
        "tpot_ms_p50": tpot_p50,
        # streams over the median TPOT: the client-side rate that merged deliveries do not distort
        # (it includes the stalls when other streams' prefills run between decode steps)
        "tpot_decode_tok_s_per_gpu": (streams / (tpot_p50 * 1e-3) / gpus) if tpot_p50 else None,
    }


def _spec(cfg: ServeBenchConfig, model_dir: Path, max_len: int, max_seqs: int) -> Any:
    from moecluster.cluster.spec import DeploymentSpec

    pool = {"replicas": cfg.replicas, "ep": cfg.ep, "device": cfg.device}
    data: dict[str, Any] = {
        "model": str(model_dir), "decode": pool,
        "cache": {"block_size": cfg.block_size, "memory_fraction": cfg.memory_fraction,
                  **({"memory_bytes": 256 << 20} if cfg.device == "cpu" else {})},
        "engine": {"dtype": cfg.dtype, "load_format": cfg.load_format, "max_model_len": max_len,
                   "max_num_seqs": max_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
                   "cuda_graph_max_batch": cfg.cuda_graph_max_batch, "async_scheduling": cfg.async_scheduling,
                   "decode_experts_w8a8": cfg.decode_experts_w8a8, "decode_linears_w8a8": cfg.decode_linears_w8a8},
        "router": {"grpc_port": 0, "http_port": 0, "metrics_port": 0, "policy": "least_load",
                   "max_queue": 4 * max_seqs},
    }
    if cfg.prefill_ep:
        data["prefill"] = {"replicas": 1, "ep": cfg.prefill_ep, "device": cfg.device}
    return DeploymentSpec.parse(data)


def run(cfg: ServeBenchConfig, save: Any = None) -> ServeBenchResult:
    import torch

    from moecluster.cluster.bench.slice_model import make_slice
    from moecluster.cluster.serve import start
    from moecluster.workers.config import ModelConfig

    if cfg.device == "cuda" and torch.cuda.device_count() < cfg.gpus:
        raise RuntimeError(f"bench serve --device cuda needs CUDA GPUs ({cfg.gpus} for this setup), this machine has "
                           f"{torch.cuda.device_count()}; --device cpu with a small --model runs it on CPUs")
    result = ServeBenchResult(config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()})
    result.config["gpus_total"] = cfg.gpus
    checkpoint = save or (lambda r: None)
    tmp = tempfile.TemporaryDirectory(prefix="moecluster-slice-")
    model_dir = cfg.model or make_slice(Path(tmp.name) / cfg.preset, cfg.preset, cfg.layers, cfg.dense_layers,
                                        cfg.routed_experts)
    mcfg = ModelConfig.from_dir(model_dir)
    result.model = {"dir": str(model_dir), "model_type": mcfg.model_type, "layers": mcfg.num_hidden_layers,
                    "moe_layers": sum(mcfg.is_moe_layer(i) for i in range(mcfg.num_hidden_layers)),
                    "experts": mcfg.n_routed_experts, "heads": mcfg.num_attention_heads, "hidden": mcfg.hidden_size,
                    "quant": type(mcfg.quant).__name__ if mcfg.quant else "none", "vocab": mcfg.vocab_size}
    max_len = max(i + o for i, o in cfg.mixes) + cfg.block_size
    max_seqs = max(cfg.concurrency)
    t_start = time.monotonic()
    serving = start(_spec(cfg, model_dir, max_len, max_seqs), write_state=False)
    result.startup_s = time.monotonic() - t_start
    print(f"serving after {result.startup_s:.1f} s (Ray, actors, weights, cache, decode graphs)", flush=True)
    try:
        result.kv_cache = kv_capacity(serving.deployment.status())
        checkpoint(result)  # the capacity and start-up time survive a run cut short
        target = serving.grpc_target
        t_warm = time.monotonic()
        if cfg.warmup:  # compiles every kernel shape the levels use: prefill chunks, decode batches
            i, _ = cfg.mixes[0]
            top = min(cfg.warmup_streams or max_seqs, max_seqs)
            for c, out_len in [(top, 1)] + [(c, 4) for c in sorted({1, top})]:
                run_level(target, LoadLevel(i, out_len, c, c, mcfg.vocab_size, seed=10_000 + c + out_len,
                                            clients=cfg.client_procs))
            result.warmup_s = time.monotonic() - t_warm
        for i, o in cfg.mixes:
            levels = [("prefill", max_seqs, 1)] if cfg.prefill_level else []
            levels += [("serve", c, o) for c in cfg.concurrency]
            for kind, c, out_len in levels:
                level = LoadLevel(i, out_len, c, c * (1 if kind == "prefill" else cfg.waves), mcfg.vocab_size,
                                  seed=cfg.seed + len(result.levels) + 1, clients=cfg.client_procs)
                serving.deployment.step_profiles(clear=True)
                records, t0, t1 = run_level(target, level)
                profiles = serving.deployment.step_profiles()
                row = {"kind": kind, "input_len": i, "output_len": out_len, "concurrency": c,
                       "client_processes": client_processes(level),
                       **summarize_level(records, t0, t1, cfg.gpus, c),
                       "rank_step_ms": _decode_step_profile(profiles)}
                # the same rate from the decode ranks' side (the client's ITLs also carry output delivery, and
                # tokens read together show as a 0 ms gap): rows sampled over seconds in their decode-only steps
                rate, rows, replayed = _rank_decode_rate(profiles)
                row["rank_decode_tok_s_per_gpu"] = rate / cfg.gpus if kind == "serve" and rate else None
                row["rank_decode_rows_mean"] = rows if kind == "serve" else None
                row["rank_decode_graph_share"] = replayed if kind == "serve" else None
                row["rank_decode_eager_reasons"] = _eager_reasons(profiles) if kind == "serve" else None
                result.levels.append(row)
                _print_level(row)
                checkpoint(result)
        result.kv_transfers = serving.deployment.transfer_outcomes()
    finally:
        serving.stop()
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    if device.type == "cuda":
        _wait_gpu_released(device)
    if cfg.roofline:
        _rooflines(cfg, mcfg, dtype, device, result)
        checkpoint(result)
    if cfg.baseline:
        _baseline(cfg, model_dir, device, dtype, result)
        checkpoint(result)
    result.summary = summarize(result, cfg)
    checkpoint(result)
    tmp.cleanup()
    return result


LONG_CONTEXTS = (131072, 262144)


def kv_capacity(status: list[dict[str, Any]]) -> dict[str, Any]:
    """Latent-cache capacity of the decode ranks (each rank holds its own sequences under data-
    parallel attention) and how many sequences of 128K / 256K tokens a rank and the pool hold."""
    ranks = [r["stats"].kv_capacity_tokens for rep in status if rep["role"] in ("decode", "both")
             for r in rep["ranks"] if r.get("stats") is not None]
    if not ranks:
        return {}
    per_rank = min(ranks)
    return {"tokens_per_rank": per_rank, "decode_ranks": len(ranks), "tokens_total": sum(ranks),
            **{f"sequences_per_rank_at_{c // 1024}k": per_rank // c for c in LONG_CONTEXTS},
            **{f"sequences_total_at_{c // 1024}k": sum(t // c for t in ranks) for c in LONG_CONTEXTS}}


def _decode_ranks(profiles: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [p for name, per_rank in profiles.items() if name.startswith("decode") for p in per_rank if p]


def _decode_step_profile(profiles: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """p50 ms per step phase, averaged over the ranks of the decode replicas (where tokens come from)."""
    ranks = _decode_ranks(profiles)
    phases = sorted({k for p in ranks for k, v in p.items() if "p50_ms" in v})
    return {k: sum(p[k]["p50_ms"] for p in ranks if k in p) / sum(1 for p in ranks if k in p) for k in phases}


def _rank_decode_rate(profiles: dict[str, list[dict[str, Any]]]) -> tuple[float | None, float | None, float | None]:
    """Tokens a second the decode ranks sampled in their decode-only steps (summed over ranks, each at
    its own rows over its own seconds); the mean rows a rank sampled in such a step: the batch the
    rate was measured at, which can fall short of the level's streams (prefills, stragglers); and the
    share of those steps that replayed a captured decode graph (None where the ranks do not say)."""
    totals = [p["decode_only"] for p in _decode_ranks(profiles) if "decode_only" in p]
    totals = [t for t in totals if t["seconds"] > 0]
    if not totals:
        return None, None, None
    rate = sum(t["rows"] / t["seconds"] for t in totals)
    steps = sum(t["steps"] for t in totals)
    replayed = sum(t["replayed"] for t in totals) / steps if all("replayed" in t for t in totals) else None
    return rate, sum(t["rows"] for t in totals) / steps, replayed


def _eager_reasons(profiles: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """The decode ranks' decode-only steps that ran eagerly, by reason, summed over ranks."""
    out: dict[str, int] = {}
    for p in _decode_ranks(profiles):
        for reason, n in (p.get("decode_only") or {}).get("eager", {}).items():
            out[reason] = out.get(reason, 0) + n
    return out


def _wait_gpu_released(device: Any, timeout_s: float = 120.0) -> None:
    """The rank actors' processes free their GPU memory some seconds after the deployment stops."""
    import torch

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free, total = torch.cuda.mem_get_info(device)
        if free > 0.9 * total:
            return
        time.sleep(1.0)
    log.warning("GPU memory not released %ds after the deployment stopped", timeout_s)


def _rooflines(cfg: ServeBenchConfig, mcfg: Any, dtype: Any, device: Any, result: ServeBenchResult) -> None:
    import torch

    from moecluster.cluster.bench.roofline import copy_bandwidth_gbs, decode_step_roofline, layer_bytes, moe_layer_step

    result.copy_gbs = copy_bandwidth_gbs(device)
    parts = layer_bytes(mcfg, dtype, mcfg.n_routed_experts // cfg.ep)  # the same for every level
    for row in result.levels:
        if row["kind"] != "serve":
            continue
        context = row["input_len"] + row["output_len"] // 2  # the mean context over a request's decode
        per_replica = -(-row["concurrency"] // cfg.replicas)  # the router spreads streams over the replicas
        roof = decode_step_roofline(mcfg, dtype, per_replica, context, cfg.ep, result.copy_gbs, parts)
        row["roofline_step_ms"] = roof["roofline_ms"]
        row["roofline_bytes"] = roof["bytes"]
        row["step_vs_roofline"] = row["step_ms_p50"] / roof["roofline_ms"] if row["step_ms_p50"] else None
    for c in sorted(set(cfg.concurrency)):
        try:
            result.moe_layer.append(moe_layer_step(mcfg, dtype, c, result.copy_gbs, device, cfg.seed,
                                                   cfg.decode_experts_w8a8, cfg.decode_linears_w8a8))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the layer's weights are gone with the call
        except RuntimeError as e:  # e.g. all experts of a layer do not fit one GPU (large EP setups)
            result.notes.append(f"MoE layer step at {c} tokens not measured: {e}")
            break


def _baseline(cfg: ServeBenchConfig, model_dir: Path, device: Any, dtype: Any, result: ServeBenchResult) -> None:
    from moecluster.cluster.bench.hf_baseline import decode_baseline

    context = cfg.mixes[0][0]
    try:
        result.baseline = decode_baseline(model_dir, cfg.baseline_concurrency, context, cfg.baseline_steps, device,
                                          dtype, cfg.seed)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        result.notes.append(f"transformers baseline not run: {type(e).__name__}: {str(e).splitlines()[0]}")


def summarize(result: ServeBenchResult, cfg: ServeBenchConfig) -> dict[str, Any]:
    """The acceptance numbers: decode rate per GPU vs transformers at the baseline's concurrency
    (and the ratio a step at its roofline would reach: the most that layout's bytes allow), and the
    MoE layer's decode step vs its roofline."""
    out: dict[str, Any] = {"gpus": cfg.gpus}
    best = max((r for r in result.levels if r["kind"] == "serve" and r.get("decode_tok_s_per_gpu")),
               key=lambda r: r["decode_tok_s_per_gpu"], default=None)
    if best is not None:  # the best level, per GPU and per 8-GPU node
        out["best_decode_tok_s_per_gpu"] = best["decode_tok_s_per_gpu"]
        out["best_decode_tok_s_per_node"] = best["decode_tok_s_per_gpu"] * min(cfg.gpus, GPUS_PER_NODE)
        out["best_decode_concurrency"] = best["concurrency"]
    serve = [r for r in result.levels if r["kind"] == "serve" and r["concurrency"] == cfg.baseline_concurrency]
    if serve and result.baseline:
        ours = serve[0]["decode_tok_s_per_gpu"]
        out["decode_tok_s_per_gpu"] = ours
        out["baseline_decode_tok_s"] = result.baseline["decode_tok_s"]
        out["speedup_vs_transformers"] = ours / result.baseline["decode_tok_s"] if ours else None
        rank_side = serve[0].get("rank_decode_tok_s_per_gpu")
        out["rank_side_speedup_vs_transformers"] = rank_side / result.baseline["decode_tok_s"] if rank_side else None
        roof = serve[0].get("roofline_step_ms")  # the ratio a decode step exactly at its roofline would give
        out["speedup_at_roofline"] = (serve[0]["concurrency"] / (roof * 1e-3) / cfg.gpus / result.baseline["decode_tok_s"]
                                      if roof else None)
    at = [m for m in result.moe_layer if m["tokens"] == cfg.baseline_concurrency] or result.moe_layer[-1:]
    if at:
        out["moe_layer_tokens"] = at[0]["tokens"]
        out["moe_layer_vs_roofline"] = at[0]["vs_roofline"]
    prefill = [r for r in result.levels if r["kind"] == "prefill"]
    if prefill:
        out["prefill_tok_s_per_gpu"] = max(r["input_tok_s_per_gpu"] for r in prefill)
    return out


def _print_level(row: dict[str, Any]) -> None:
    print(f"{row['kind']:>7} {row['input_len']:>6}/{row['output_len']:<5} c={row['concurrency']:<4} "
          f"in {row['input_tok_s_per_gpu']:9.0f} out {row['output_tok_s_per_gpu']:8.0f} tok/s/GPU  "
          f"TTFT p50 {_f(row['ttft_ms_p50'], '8.1f')} p99 {_f(row['ttft_ms_p99'], '8.1f')}  "
          f"ITL p50 {_f(row['itl_ms_p50'], '7.2f')} p99 {_f(row['itl_ms_p99'], '7.2f')} ms  "
          f"TPOT p50 {_f(row.get('tpot_ms_p50'), '7.2f')} ms  errors {row['errors']} "
          f"{' '.join(row['error_examples'])}", flush=True)
    if row.get("rank_step_ms"):
        print("        rank step p50 ms: " + ", ".join(f"{k} {v:.2f}" for k, v in row["rank_step_ms"].items()), flush=True)
    if row.get("rank_decode_tok_s_per_gpu"):
        share = row.get("rank_decode_graph_share")
        print(f"        rank-side decode {row['rank_decode_tok_s_per_gpu']:.0f} tok/s/GPU in decode-only steps of "
              f"{row['rank_decode_rows_mean']:.1f} rows a rank on average"
              + (f", {share:.0%} of them graph replays" if share is not None else ""), flush=True)
        for reason, n in (row.get("rank_decode_eager_reasons") or {}).items():
            print(f"          eager: {n} steps: {reason}", flush=True)


def _rank_cell(r: dict[str, Any]) -> str:
    """The rank-side rate and, after @, the mean rows of the decode-only steps it was measured in."""
    if r["kind"] != "serve" or not r.get("rank_decode_tok_s_per_gpu"):
        return "-"
    return f"{r['rank_decode_tok_s_per_gpu']:.0f} @{r['rank_decode_rows_mean']:.0f}"


def print_tables(result: ServeBenchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result.model
    table = Table(title=f"bench serve: {m.get('model_type')} {m.get('layers')} layers ({m.get('moe_layers')} MoE, "
                        f"{m.get('experts')} experts, {m.get('quant')}), {result.config['gpus_total']} GPU(s)")
    for col in ("kind", "in/out", "conc", "in tok/s/GPU", "out tok/s/GPU", "decode tok/s/GPU", "rank-side",
                "TTFT p50/p99 ms", "ITL p50/p99 ms", "TPOT p50 ms", "roofline ms", "step/roofline", "errors"):
        table.add_column(col, justify="right")
    for r in result.levels:
        table.add_row(r["kind"], f"{r['input_len']}/{r['output_len']}", str(r["concurrency"]),
                      _f(r["input_tok_s_per_gpu"], ".0f"), _f(r["output_tok_s_per_gpu"], ".0f"),
                      _f(r.get("decode_tok_s_per_gpu"), ".0f") if r["kind"] == "serve" else "-",
                      _rank_cell(r),
                      f"{_f(r['ttft_ms_p50'], '.0f')} / {_f(r['ttft_ms_p99'], '.0f')}",
                      f"{_f(r['itl_ms_p50'], '.2f')} / {_f(r['itl_ms_p99'], '.2f')}",
                      _f(r.get("tpot_ms_p50"), ".2f"),
                      _f(r.get("roofline_step_ms"), ".2f"), _f(r.get("step_vs_roofline"), ".2f"), str(r["errors"]))
    console = Console(width=200)
    console.print(table)
    if result.moe_layer:
        t = Table(title=f"one MoE layer, decode batch (copy {result.copy_gbs:.0f} GB/s)")
        for col in ("tokens", "experts hit", "GiB read", "ms (graph)", "ms (eager)", "roofline ms", "vs roofline"):
            t.add_column(col, justify="right")
        for r in result.moe_layer:
            t.add_row(str(r["tokens"]), str(r["experts_hit"]), f"{r['bytes'] / 2**30:.2f}", f"{r['ms']:.3f}",
                      _f(r.get("eager_ms"), ".3f"), f"{r['roofline_ms']:.3f}", f"{r['vs_roofline']:.2f}x")
        console.print(t)
    if result.baseline:
        b = result.baseline
        console.print(f"baseline: {b['implementation']}, {b['dtype']}: {b['decode_tok_s']:.0f} decode tok/s at "
                      f"concurrency {b['concurrency']}, context {b['context']} (step {b['step_ms_p50']:.1f} ms)")
    if result.kv_cache:
        console.print(f"KV cache: {result.kv_cache}")
    if result.kv_transfers:
        console.print(f"prefill -> decode KV handoffs: {result.kv_transfers}")
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"summary: {json.dumps(result.summary)}")


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(cfg: ServeBenchConfig, out: Path | None, png: Path | None = None) -> ServeBenchResult:
    def save(result: ServeBenchResult) -> None:
        if out is not None:
            write_json(out, asdict(result))

    result = run(cfg, save)
    print_tables(result)
    if png is not None:
        from moecluster.cluster.bench.serve_plot import plot

        try:
            plot(asdict(result), png)
        except ImportError as e:
            print(f"no PNG ({e}); draw it later with `moecluster bench plot-serve {out} --png {png}`")
    return result
