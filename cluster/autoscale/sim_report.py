"""The `moecluster autoscale simulate` command: pools from a spec, the report (JSON), the plot (PNG)
and the printed table over `simulate.compare`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from moecluster.cluster.autoscale.service_model import ServiceModel
from moecluster.cluster.autoscale.simulate import Comparison, PoolSetup, Role, SimResult, compare
from moecluster.cluster.autoscale.trace import TraceRequest, load_trace, trace_stats
from moecluster.cluster.spec import AutoscalingSpec, DeploymentSpec, ScaleBounds, SpecError

DEFAULT_BOUNDS = ScaleBounds(min_replicas=1, max_replicas=8)


def setup_from_spec(
    spec: DeploymentSpec | None, policy: str | None, model: ServiceModel
) -> tuple[list[PoolSetup], AutoscalingSpec, ServiceModel]:
    """Pools, autoscaling settings and the replica model for a deployment spec.

    Without a spec: one colocated pool of 1 replica autoscaled within [1, 8], default settings.
    With one: its pools, sizes and bounds; `policy` replaces its autoscaling policy; the engine's
    max_num_seqs and max_num_batched_tokens (per rank) set the model's per-replica limits. A pool's
    GPUs per replica (ep on cuda) must match the model's."""
    if spec is None:
        autoscaling = _with_policy(AutoscalingSpec(decode=DEFAULT_BOUNDS), policy)
        return [PoolSetup("decode", "both", 1, autoscaling.decode)], autoscaling, model
    autoscaling = _with_policy(spec.autoscaling or AutoscalingSpec(), policy)
    pools = []
    for name, pool in spec.pools().items():
        if pool.device == "cuda" and pool.ep != model.gpus_per_replica:
            raise ValueError(f"{name}.ep: {pool.ep} GPUs per replica, but the service model describes "
                             f"{model.gpus_per_replica}; pass a model calibrated for that replica (--model)")
        role: Role = "both" if spec.colocated else ("prefill" if name == "prefill" else "decode")
        pools.append(PoolSetup(name, role, pool.replicas, getattr(autoscaling, name)))
    ep, engine = spec.decode.ep, spec.engine
    chunk = engine.max_num_batched_tokens * ep if engine.max_num_batched_tokens else model.prefill_chunk_tokens
    return pools, autoscaling, replace(model, max_running_seqs=engine.max_num_seqs * ep, prefill_chunk_tokens=chunk)


def _with_policy(autoscaling: AutoscalingSpec, policy: str | None) -> AutoscalingSpec:
    if policy is None or policy == autoscaling.policy:
        return autoscaling
    try:
        return AutoscalingSpec.model_validate(autoscaling.model_dump() | {"policy": policy})
    except ValidationError as e:
        reasons = "; ".join(err["msg"].removeprefix("Value error, ").removeprefix("policy: ") for err in e.errors())
        raise SpecError(f"--policy: {reasons}") from None


def report(comparison: Comparison, requests: Sequence[TraceRequest], model: ServiceModel,
           pools: Sequence[PoolSetup], autoscaling: AutoscalingSpec, trace_path: str | Path | None = None) -> dict[str, Any]:
    """The JSON report: settings, each run's summary, replicas over time and per-request latencies."""
    targets = autoscaling.targets

    def run(r: SimResult) -> dict[str, Any]:
        return r.summary(targets) | {
            "timeline": {pool: [list(e) for e in line] for pool, line in r.timeline.items()},
            "decisions": [asdict(d) for d in r.decisions],
            "per_request": {
                "ttft_s": [round(v, 4) for v in r.ttft_s],
                "itl_mean_s": [None if v is None else round(v, 5) for v in r.itl_mean_s],
            },
        }

    return {
        "trace": {"path": str(trace_path) if trace_path else None} | trace_stats(requests, autoscaling.interval_s),
        "arrivals_s": [r.arrival_s for r in requests],
        "model": asdict(model),
        "pools": [{"name": p.name, "role": p.role, "replicas": p.replicas,
                   "bounds": p.bounds.model_dump() if p.bounds else None} for p in pools],
        "autoscaling": autoscaling.model_dump(),
        "static_replicas": comparison.static_replicas,
        "policy": run(comparison.policy),
        "static": run(comparison.static),
    }


def plot(report_data: dict[str, Any], path: str | Path) -> Path:
    """replicas.png: requests/s; replicas over time, policy vs static (solid: billed, i.e. serving +
    starting + draining; dotted: serving); TTFT of each request by arrival time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("the plot needs matplotlib (pip install matplotlib); report.json is written") from None
    bin_s = report_data["autoscaling"]["interval_s"]
    arrivals = report_data["arrivals_s"]
    ttft_target = report_data["autoscaling"]["targets"]["ttft_s"]
    fig, (ax_rps, ax_rep, ax_ttft) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    bins = [i * bin_s for i in range(int(max(arrivals) // bin_s) + 2)]
    ax_rps.hist(arrivals, bins=bins, weights=[1 / bin_s] * len(arrivals), color="tab:gray")
    ax_rps.set_ylabel(f"requests/s ({bin_s:g} s bins)")
    for label, color in (("static", "tab:orange"), ("policy", "tab:blue")):
        run = report_data[label]
        for pool, line in run["timeline"].items():
            times = [e[0] for e in line]
            style = "-" if pool == "decode" else "--"
            ax_rep.step(times, [e[1] + e[2] + e[3] for e in line], where="post", color=color, linestyle=style,
                        label=f"{label} {pool}: billed")
            if label == "policy":
                ax_rep.step(times, [e[1] for e in line], where="post", color=color, linestyle=":", linewidth=1,
                            label=f"{label} {pool}: serving")
        ax_ttft.scatter(arrivals, run["per_request"]["ttft_s"], s=2, color=color, alpha=0.4,
                        label=f"{label}: SLO met by {run['attainment']['slo']:.1%}, {run['gpu_hours']:.1f} GPU-h")
    ax_rep.set_ylabel("replicas")
    ax_rep.legend(loc="upper left", fontsize=8)
    ax_ttft.axhline(ttft_target, color="tab:red", linewidth=1, label=f"TTFT target {ttft_target:g} s")
    ax_ttft.set_yscale("log")
    ax_ttft.set_ylabel("TTFT (s)")
    ax_ttft.set_xlabel("time (s)")
    ax_ttft.legend(loc="upper left", fontsize=8, markerscale=4)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(
    trace_path: str | Path,
    spec_path: str | Path | None = None,
    policy: str | None = None,
    out_dir: str | Path = "autoscale-sim",
    model: ServiceModel | None = None,
    static_replicas: Mapping[str, int] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """The CLI: simulate, print a table, write `report.json` and `replicas.png` under `out_dir`."""
    requests = load_trace(trace_path)
    try:
        spec = DeploymentSpec.from_yaml(spec_path) if spec_path else None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
        raise SpecError(f"spec file {spec_path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    pools, autoscaling, model = setup_from_spec(spec, policy, model or ServiceModel())
    comparison = compare(requests, model, pools, autoscaling, static_replicas)
    data = report(comparison, requests, model, pools, autoscaling, trace_path)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(data))
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write the report there: {e.strerror or e}") from None

    console = console or Console(width=max(Console().width, 132))
    t = autoscaling.targets
    table = Table(title=f"{len(requests)} requests, policy {autoscaling.policy} vs static "
                        f"{comparison.static_replicas}: targets TTFT {t.ttft_s} s, ITL {t.itl_s} s")
    for col in ("run", "SLO met", "TTFT met", "ITL met", "TTFT p90 s", "ITL p90 s", "GPU-hours", "peak serving", "scalings"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name in ("policy", "static"):
        s = data[name]
        a = s["attainment"]
        table.add_row(name, f"{a['slo']:.1%}", f"{a['ttft']:.1%}", f"{a['itl']:.1%}", f"{s['ttft_s']['p90']:.2f}",
                      "-" if s["itl_token_s"]["p90"] is None else f"{s['itl_token_s']['p90']:.3f}", f"{s['gpu_hours']:.1f}",
                      ", ".join(f"{k} {v}" for k, v in s["peak_serving"].items()), str(s["scale_events"]))
    console.print(table)
    png = plot(data, out / "replicas.png")
    console.print(f"wrote {out / 'report.json'} and {png}")
    return data
