"""`moecluster bench eplb`: how evenly expert-parallel ranks are loaded before and after EPLB.

The trace is synthetic and skewed. For each layer, expert popularity follows a Zipf law over a
random permutation of the experts, p(perm[i]) ∝ 1 / (i + 1)^zipf; every token picks top_k
distinct experts, sampled without replacement from p (an exponential race, the same law as
Gumbel top-k). Seeded numpy generators: one for the permutations, one for the recorded trace,
one for a fresh trace from the same distribution.

The recorded trace goes through `ExpertLoadWindow` in steps of `step_tokens` tokens (the window
covers the whole trace); its totals drive `rebalance` under both policies, starting from
`ExpertPlacement.contiguous` (the placement a group boots with). Each rank's load is the tokens
it computes when every expert's tokens split evenly over its replicas (what dispatch does);
reported per layer as max / mean over ranks, and overall as the sum over layers of the max over
the sum of the means (MoE layers run in lockstep, so a step costs the sum of each layer's slowest
rank). "after" is measured on the recorded trace and on the fresh one, so a placement that only
fits the recording's noise shows. The target is max / mean <= 1.10 on both. Moves are the slots
whose expert changes (`moves_to`); cross-rank ones copy weights over the network. `churn` is
what the next periodic rebalance would move when nothing changed but the sample: `rebalance` on
the fresh trace, starting from the placement it computed on the recorded one. `node_ratio` (max /
mean tokens per node) bounds what `hierarchical` can reach: its groups stay whole on one node and
every node has the same slots, and this trace, unlike a group-limited gate, ignores the groups.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from moecluster.cluster.bench import machine_info, write_json
from moecluster.router.experts.eplb import ExpertLoadWindow, hierarchical_applies, rank_loads, rebalance
from moecluster.router.experts.placement import ExpertPlacement

TARGET = 1.10  # max / mean tokens per rank after rebalancing
POLICIES = ("global", "hierarchical")
# One routed expert of DeepSeek-V3 in FP8: gate, up and down projections of 7168 x 2048 (scales
# excluded); what one cross-rank move copies.
EXPERT_BYTES_FP8 = 3 * 7168 * 2048


@dataclass(frozen=True)
class EplbBenchConfig:
    experts: int = 256
    ranks: int = 32
    redundant: int = 32
    nodes: int = 4
    groups: int = 8
    zipf: float = 1.2
    tokens: int = 65536  # per layer, per trace
    layers: int = 4
    top_k: int = 8
    step_tokens: int = 4096  # tokens per recorded step
    keep_slack: float = 0.01  # rebalance(keep_slack=): load above the mean allowed to keep experts in place
    seed: int = 0
    quick: bool = False

    def __post_init__(self) -> None:
        for name in ("experts", "ranks", "nodes", "groups", "tokens", "layers", "top_k", "step_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.redundant < 0:
            raise ValueError(f"redundant must be >= 0, got {self.redundant}")
        if (self.experts + self.redundant) % self.ranks:
            raise ValueError(f"experts + redundant = {self.experts + self.redundant} is not divisible by "
                             f"ranks {self.ranks}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} exceeds experts {self.experts}")
        if not (math.isfinite(self.zipf) and self.zipf >= 0):
            raise ValueError(f"zipf must be finite and >= 0, got {self.zipf}")
        if not (math.isfinite(self.keep_slack) and self.keep_slack >= 0):
            raise ValueError(f"keep_slack must be finite and >= 0, got {self.keep_slack}")

    @property
    def slots_per_rank(self) -> int:
        return (self.experts + self.redundant) // self.ranks

    @property
    def window_steps(self) -> int:
        return -(-self.tokens // self.step_tokens)

    @classmethod
    def quick_sizes(cls) -> EplbBenchConfig:
        return cls(experts=64, ranks=8, redundant=8, nodes=2, groups=4, tokens=8192, layers=2, step_tokens=1024,
                   quick=True)


# ---- the trace -----------------------------------------------------------------------------------
def zipf_probs(num_experts: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """(experts,) popularity: Zipf over a random permutation of the experts."""
    ranked = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** exponent
    probs = np.empty(num_experts)
    probs[rng.permutation(num_experts)] = ranked / ranked.sum()
    return probs


def sample_counts(probs: np.ndarray, tokens: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """(experts,) int64: how many of `tokens` tokens chose each expert, top_k distinct per token."""
    # An exponential race: expert e finishes at Exp(1) / p[e]; the first top_k to finish are a
    # sample without replacement from p (the same law as Gumbel top-k).
    keys = rng.standard_exponential((tokens, probs.size), dtype=np.float32) / probs.astype(np.float32)
    ids = np.argpartition(keys, top_k - 1, axis=1)[:, :top_k]  # (tokens, top_k) the k earliest
    return np.bincount(ids.ravel(), minlength=probs.size)


def record_trace(cfg: EplbBenchConfig, probs: list[np.ndarray], rng: np.random.Generator) -> ExpertLoadWindow:
    window = ExpertLoadWindow(cfg.layers, cfg.experts, cfg.window_steps)
    for start in range(0, cfg.tokens, cfg.step_tokens):
        n = min(cfg.step_tokens, cfg.tokens - start)
        for layer, p in enumerate(probs):
            window.record(layer, sample_counts(p, n, cfg.top_k, rng).tolist())
    return window


def fresh_trace(cfg: EplbBenchConfig, probs: list[np.ndarray], rng: np.random.Generator) -> list[list[float]]:
    out = []
    for p in probs:
        counts = sum(sample_counts(p, min(cfg.step_tokens, cfg.tokens - s), cfg.top_k, rng)
                     for s in range(0, cfg.tokens, cfg.step_tokens))
        out.append([float(c) for c in counts])
    return out


# ---- measuring -------------------------------------------------------------------------------------
def _loads(placement: ExpertPlacement, load: list[float], ranks_per_node: int) -> dict:
    ranks = rank_loads(placement, load)
    nodes = [math.fsum(ranks[i:i + ranks_per_node]) for i in range(0, len(ranks), ranks_per_node)]
    mean = math.fsum(ranks) / len(ranks)
    return {"max": max(ranks), "mean": mean, "ratio": max(ranks) / mean if mean else 1.0,
            "node_ratio": max(nodes) * len(nodes) / math.fsum(nodes) if mean else 1.0}


def _moves(before: ExpertPlacement, after: ExpertPlacement) -> dict:
    moves = before.moves_to(after)
    remote = sum(before.rank_of(slot) != before.rank_of(src) for slot, _, src in moves)
    return {"moves": len(moves), "cross_rank": remote, "cross_rank_bytes_fp8": remote * EXPERT_BYTES_FP8}


def _overall(rows: list[dict]) -> dict:
    """Sum over layers of the slowest rank over the sum of the mean rank."""
    ratio = math.fsum(r["max"] for r in rows) / math.fsum(r["mean"] for r in rows)
    return {"ratio": ratio, "worst_layer": max(r["ratio"] for r in rows)}


def run(cfg: EplbBenchConfig, out: Path, console: Console | None = None) -> dict:
    console = console or Console(width=max(Console().width, 132))
    start = time.perf_counter()
    dist_rng, rec_rng, fresh_rng = (np.random.default_rng([cfg.seed, i]) for i in range(3))
    probs = [zipf_probs(cfg.experts, cfg.zipf, dist_rng) for _ in range(cfg.layers)]
    window = record_trace(cfg, probs, rec_rng)
    recorded, fresh = window.totals(), fresh_trace(cfg, probs, fresh_rng)
    sample_s = time.perf_counter() - start

    spr, per_node = cfg.slots_per_rank, cfg.ranks // cfg.nodes if cfg.ranks % cfg.nodes == 0 else cfg.ranks
    contiguous = ExpertPlacement.contiguous(cfg.experts, cfg.ranks, cfg.redundant)
    layers, placements = [], {p: [] for p in POLICIES}
    for i in range(cfg.layers):
        row = {"layer": i, "hottest_share": max(recorded[i]) / math.fsum(recorded[i]),
               "before": {"recorded": _loads(contiguous, recorded[i], per_node),
                          "fresh": _loads(contiguous, fresh[i], per_node)}}
        for policy in POLICIES:
            t0 = time.perf_counter()
            placed = rebalance(recorded[i], cfg.ranks, spr, cfg.nodes, cfg.groups, policy, contiguous, cfg.keep_slack)
            ms = (time.perf_counter() - t0) * 1e3
            again = rebalance(fresh[i], cfg.ranks, spr, cfg.nodes, cfg.groups, policy, placed, cfg.keep_slack)
            rec, new = _loads(placed, recorded[i], per_node), _loads(placed, fresh[i], per_node)
            row[policy] = {"recorded": rec, "fresh": new, **_moves(contiguous, placed),
                           "churn": len(placed.moves_to(again)), "rebalance_ms": ms,
                           "max_replicas": max(placed.replicas(e) for e in range(cfg.experts)),
                           "ok": max(rec["ratio"], new["ratio"]) <= TARGET}
            placements[policy].append(placed.to_dict())
        layers.append(row)

    overall: dict = {"before": {t: _overall([r["before"][t] for r in layers]) for t in ("recorded", "fresh")}}
    for policy in POLICIES:
        o = {t: _overall([r[policy][t] for r in layers]) for t in ("recorded", "fresh")}
        o["moves"] = sum(r[policy]["moves"] for r in layers)
        o["cross_rank"] = sum(r[policy]["cross_rank"] for r in layers)
        o["churn"] = sum(r[policy]["churn"] for r in layers)
        o["ok"] = all(r[policy]["ok"] for r in layers)
        overall[policy] = o
    result = {
        "benchmark": "eplb",
        "config": {**asdict(cfg), "slots_per_rank": spr, "window_steps": cfg.window_steps,
                   "hierarchical_applies": hierarchical_applies(cfg.experts, cfg.ranks, spr, cfg.nodes, cfg.groups)},
        "machine": machine_info(),
        "target": TARGET,
        "mean_tokens_per_rank": cfg.tokens * cfg.top_k / cfg.ranks,
        "layers": layers,
        "overall": overall,
        "placements": placements,
        "sample_s": sample_s,
        "wall_s": time.perf_counter() - start,
    }
    write_json(out, result)
    _print(console, result, out)
    return result


def _print(console: Console, result: dict, out: Path) -> None:
    c = result["config"]
    hier = "groups packed onto nodes" if c["hierarchical_applies"] else "falls back to global"
    t = Table(title=(f"EPLB: max / mean tokens per rank, {c['experts']} experts on {c['ranks']} ranks x "
                     f"{c['slots_per_rank']} slots ({c['redundant']} redundant), {c['nodes']} nodes, {c['groups']} "
                     f"groups, Zipf {c['zipf']:g}, top-{c['top_k']}, {c['tokens']} tokens/layer "
                     f"(target <= {result['target']:.2f}; hierarchical: {hier})"))
    cols = ("layer", "hottest", "before", "policy", "after rec", "after fresh", "max tok", "node",
            "moves", "remote", "churn", "repl", "ms", "")
    for col in cols:
        t.add_column(col, justify="left" if col in ("layer", "policy") else "right")
    for r in result["layers"]:
        for j, policy in enumerate(POLICIES):
            p = r[policy]
            head = (str(r["layer"]), f"{r['hottest_share']:.3f}", f"{r['before']['fresh']['ratio']:.3f}") if j == 0 \
                else ("", "", "")
            t.add_row(*head, policy, f"{p['recorded']['ratio']:.3f}", f"{p['fresh']['ratio']:.3f}",
                      f"{p['fresh']['max']:.0f}", f"{p['fresh']['node_ratio']:.3f}", str(p["moves"]),
                      str(p["cross_rank"]), str(p["churn"]), str(p["max_replicas"]), f"{p['rebalance_ms']:.0f}",
                      "ok" if p["ok"] else "over", end_section=j == len(POLICIES) - 1)
    o = result["overall"]
    for j, policy in enumerate(POLICIES):
        p = o[policy]
        head = ("all", "", f"{o['before']['fresh']['ratio']:.3f}") if j == 0 else ("", "", "")
        t.add_row(*head, policy, f"{p['recorded']['ratio']:.3f}", f"{p['fresh']['ratio']:.3f}", "", "",
                  str(p["moves"]), str(p["cross_rank"]), str(p["churn"]), "", "", "ok" if p["ok"] else "over")
    console.print(t)
    console.print(
        f"hottest: the hottest expert's share of the layer's choices; before: contiguous placement, on the fresh "
        f"trace; after rec / after fresh: rebalanced on the recorded trace, measured on it / on a fresh one; max tok: "
        f"busiest rank's tokens on the fresh trace (mean {result['mean_tokens_per_rank']:.0f}); node: max / mean "
        f"tokens per node (fresh), the floor for hierarchical; moves: slots changed from the contiguous placement, "
        f"remote: those copied from another rank; churn: slots a second rebalance (on the fresh trace) changes; repl: "
        f"most replicas of one expert; ms: one rebalance call; all: sum over layers of the busiest rank / sum of the "
        f"mean; ok: both after <= {result['target']:.2f}")
    console.print(f"wrote {out} ({result['wall_s']:.1f} s, sampling {result['sample_s']:.1f} s)")
