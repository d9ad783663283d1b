"""The plan as rich tables or as one JSON object."""

from __future__ import annotations

from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from moecluster.cluster.plan.memory import GiB, RankMemory
from moecluster.cluster.plan.planner import Plan, layout_words
from moecluster.cluster.plan.presets import format_label


def plan_to_dict(p: Plan) -> dict:
    w, c = p.weights, p.cfg

    def layout(r: RankMemory | None) -> dict | None:
        if r is None:
            return None
        return {**asdict(r), "weights_bytes": r.weights_bytes, "fits": r.fits, "seqs_per_replica": r.seqs_per_replica,
                "nodes": r.ep / p.config.gpus_per_node}

    return {
        "model": p.model,
        "model_type": c.model_type,
        "format": format_label(c),
        "max_position_embeddings": c.max_position_embeddings,
        "gpu": {**asdict(p.config.spec), "capacity_gib": p.config.spec.capacity_bytes / GiB},
        "config": asdict(p.config),
        "context": p.context,
        "params": {
            "total": w.total_params,
            "activated_per_token": w.activated_params,
            "mtp_on_disk_not_loaded": w.mtp_params,
            "mtp_unique": w.mtp_unique_params,
            "total_with_mtp": w.total_params + w.mtp_params,
        },
        "weights": {
            "components": [asdict(x) for x in w.components],
            "replicated_bytes": w.replicated_bytes,
            "routed_bytes": w.routed_bytes,
            "total_bytes": w.total_bytes,
            "expert_params": w.expert_params,
            "expert_slot_bytes": w.expert_slot_bytes,
            "moe_layers": w.moe_layers,
        },
        "kv_bytes_per_token": p.kv_per_token,
        "rank": layout(p.rank),
        "minimal": layout(p.minimal),
        "comfortable": layout(p.comfortable),
        "verdict": p.verdict,
        "notes": list(p.notes),
    }


def print_plan(p: Plan, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 132))
    w, c, cfg = p.weights, p.cfg, p.config
    console.print(
        f"[bold]{p.model}[/bold] ({c.model_type}): {c.num_hidden_layers} layers ({c.first_k_dense_replace} dense), "
        f"hidden {c.hidden_size}, {c.n_routed_experts} routed experts top-{c.num_experts_per_tok} + "
        f"{c.n_shared_experts} shared, {c.num_attention_heads} heads, vocab {c.vocab_size:,}, "
        f"max context {c.max_position_embeddings:,}\n"
        f"weights: {format_label(c)}\n"
        f"params: {w.total_params / 1e9:.1f}B loaded, {w.activated_params / 1e9:.1f}B activated per token"
        + (f", {(w.total_params + w.mtp_params) / 1e9:.1f}B on disk with MTP" if w.mtp_params else "")
    )
    t = Table(title=f"weights per rank at EP {p.rank.ep}")
    for col in ("component", "params", "whole model", "per rank", "placement"):
        t.add_column(col, justify="left" if col in ("component", "placement") else "right")
    for x in w.components:
        per_rank = p.rank.routed_bytes if x.routed else x.bytes
        where = f"split: {p.rank.experts_per_rank} experts x {w.moe_layers} layers" if x.routed else "replicated"
        t.add_row(x.name, f"{x.params / 1e9:.3f}B", _gib(x.bytes), _gib(per_rank), where + (f"; {x.note}" if x.note else ""))
    t.add_row("[bold]total[/bold]", f"{w.total_params / 1e9:.3f}B", _gib(w.total_bytes), _gib(p.rank.weights_bytes), "")
    console.print(t)
    m = Table(title=(f"per-GPU memory on {cfg.spec.label} ({_gib(cfg.spec.capacity_bytes)}), {cfg.nodes} node(s) x "
                     f"{cfg.gpus_per_node}, context {p.context:,}, KV {cfg.kv_dtype} {p.kv_per_token:,} B/token"))
    cols = ("layout", "EP", "experts/rank", "weights", "headroom", "KV", "KV tokens/GPU", "seqs/GPU", "seqs/replica",
            "replicas", "fits")
    for col in cols:
        m.add_column(col, justify="left" if col == "layout" else "right")
    rows = [("asked", p.rank), ("minimal", p.minimal), ("comfortable", p.comfortable)]
    for label, r in rows:
        if r is None:
            m.add_row(label, *["-"] * (len(cols) - 2), "none up to 64 nodes")
            continue
        m.add_row(label, str(r.ep), str(r.experts_per_rank), _gib(r.weights_bytes), _gib(r.headroom_bytes),
                  _gib(r.kv_bytes), f"{r.kv_tokens:,}", f"{r.seqs_per_gpu:,}", f"{r.seqs_per_replica:,}",
                  str(r.replicas), "yes" if r.fits else "no")
    console.print(m)
    what = {"minimal": "smallest EP with one full-context sequence per GPU",
            "comfortable": f"smallest EP with one per GPU and >= {cfg.comfortable_seqs} per replica"}
    for label, r in rows[1:]:
        console.print(f"{label} ({what[label]}): " + (layout_words(cfg, r) if r else "none up to 64 nodes"))
    console.print(f"[bold]verdict:[/bold] {p.verdict}")
    for note in p.notes:
        console.print(f"note: {note}")
    console.print(f"[dim]capacity: {cfg.spec.source}; headroom = {1 - cfg.memory_fraction:.0%} of it held back "
                  f"(memory fraction {cfg.memory_fraction:g}) + {cfg.reserve_gib:g} GiB in use before the cache is sized "
                  f"+ one {cfg.max_batched_tokens}-token step's activations at this context[/dim]")


def _gib(n: int) -> str:
    return f"{n / GiB:,.1f} GiB"
