"""The PNG of `moecluster bench serve`: throughput and latency against concurrency, one line per
request mix (matplotlib; `moecluster bench plot-serve RESULT.json` redraws it from the JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(result: dict[str, Any], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["levels"] if r["kind"] == "serve"]
    mixes = sorted({(r["input_len"], r["output_len"]) for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mix in mixes:
        pts = sorted((r for r in rows if (r["input_len"], r["output_len"]) == mix), key=lambda r: r["concurrency"])
        c = [r["concurrency"] for r in pts]
        label = f"{mix[0]}/{mix[1]}"
        axes[0].plot(c, [r["decode_tok_s_per_gpu"] or 0 for r in pts], "o-", label=f"{label} decode")
        axes[0].plot(c, [r["output_tok_s_per_gpu"] for r in pts], "s--", label=f"{label} output (wall)")
        axes[1].plot(c, [r["ttft_ms_p50"] or 0 for r in pts], "o-", label=f"{label} p50")
        axes[1].plot(c, [r["ttft_ms_p99"] or 0 for r in pts], "x--", label=f"{label} p99")
        axes[2].plot(c, [r["itl_ms_p50"] or 0 for r in pts], "o-", label=f"{label} p50")
        axes[2].plot(c, [r["itl_ms_p99"] or 0 for r in pts], "x--", label=f"{label} p99")
        roof = [r.get("roofline_step_ms") for r in pts]
        if all(v is not None for v in roof):
            axes[2].plot(c, roof, ":", color="gray", label=f"{label} roofline step")
    base = result.get("baseline")
    if base:
        axes[0].axhline(base["decode_tok_s"], color="red", ls=":", label=f"transformers eager (c={base['concurrency']})")
    for ax, title, unit in zip(axes, ("tokens/s per GPU", "TTFT", "ITL"), ("tok/s", "ms", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes:  # p99s sit orders of magnitude above p50s
        ax.set_yscale("log")
    m = result.get("model", {})
    fig.suptitle(f"moecluster bench serve: {m.get('model_type')} slice, {m.get('layers')} layers, "
                 f"{m.get('quant')}, {result['config'].get('gpus_total')} GPU(s)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
