"""One plan: the model's weights, one rank's memory at the asked EP, the smallest layouts, a verdict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moecluster.cluster.plan.memory import GiB, PlanConfig, RankMemory, rank_memory, smallest
from moecluster.cluster.plan.presets import resolve_model
from moecluster.cluster.plan.weights import WeightBreakdown, kv_bytes_per_token, weight_breakdown
from moecluster.workers.config import ModelConfig


@dataclass(frozen=True)
class Plan:
    model: str
    cfg: ModelConfig
    config: PlanConfig
    context: int
    weights: WeightBreakdown
    kv_per_token: int
    rank: RankMemory  # at the asked EP (default: every GPU in one replica)
    minimal: RankMemory | None  # smallest EP with one full-context sequence per GPU
    comfortable: RankMemory | None  # ... and comfortable_seqs per replica
    verdict: str
    notes: tuple[str, ...]


def make_plan(model: str | Path, config: PlanConfig) -> Plan:
    name, cfg = resolve_model(model)
    context = config.context or cfg.max_position_embeddings
    if context > cfg.max_position_embeddings:
        raise ValueError(f"--context {context} exceeds {name}'s max_position_embeddings {cfg.max_position_embeddings}")
    w = weight_breakdown(cfg)
    kv = kv_bytes_per_token(cfg, config.kv_dtype)
    ep = config.ep or config.total_gpus
    act = step_activation_bytes(cfg, config, context)
    rank = rank_memory(w, config, ep, act, kv, context)
    minimal = smallest(w, config, act, kv, context, 1)
    comfortable = smallest(w, config, act, kv, context, config.comfortable_seqs)
    return Plan(name, cfg, config, context, w, kv, rank, minimal, comfortable,
                verdict(config, context, rank, minimal), tuple(_notes(cfg, w, config, rank)))


def step_activation_bytes(cfg: ModelConfig, config: PlanConfig, context: int) -> int:
    """The engine's reserve for one step (a full prefill chunk at the longest context), in bf16."""
    import torch

    from moecluster.workers.engine.kv_cache import activation_bytes

    return activation_bytes(cfg, config.max_batched_tokens, torch.bfloat16, context=context)


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def layout_words(config: PlanConfig, r: RankMemory) -> str:
    """`EP 16 = 2 nodes x 8 (1 replica on this cluster)`."""
    nodes = r.ep / config.gpus_per_node
    size = f"{nodes:g} node(s) x {config.gpus_per_node}" if nodes >= 1 else f"{r.ep} of {config.gpus_per_node} GPUs"
    where = f"{r.replicas} replica(s) on this cluster" if r.replicas else "more GPUs than this cluster has"
    return f"EP {r.ep} = {size} ({where})"


def verdict(config: PlanConfig, context: int, r: RankMemory, minimal: RankMemory | None) -> str:
    gpu = config.spec.label
    if not r.fits:
        alone = "fit alone but not with" if r.weights_bytes <= r.capacity_bytes else "alone exceed it, before"
        head = (f"does not fit at EP {r.ep}: one {gpu} has {gib(r.capacity_bytes)}; the rank's {gib(r.weights_bytes)} "
                f"of weights {alone} the {gib(r.headroom_bytes)} headroom")
    elif r.seqs_per_gpu == 0:
        head = (f"weights fit at EP {r.ep} ({gib(r.weights_bytes)} + {gib(r.headroom_bytes)} headroom of "
                f"{gib(r.capacity_bytes)}) but the {gib(r.kv_bytes)} left hold {r.kv_tokens:,} tokens per GPU: "
                f"fewer than one {context:,}-token sequence")
    else:
        total = r.seqs_per_replica * r.replicas
        head = (f"fits at EP {r.ep}: {r.seqs_per_gpu:,} sequence(s) of {context:,} tokens per GPU, "
                f"{r.seqs_per_replica:,} per replica, x {r.replicas} replica(s) = {total:,} on {config.total_gpus} GPUs")
    if r.fits and r.seqs_per_gpu >= 1:
        return head
    if minimal is None:
        return f"{head}; no layout up to {max(64, config.nodes)} nodes serves one {context:,}-token sequence per GPU"
    return f"{head}; smallest layout with one such sequence per GPU: {layout_words(config, minimal)}"


def _notes(cfg: ModelConfig, w: WeightBreakdown, config: PlanConfig, r: RankMemory) -> list[str]:
    notes = []
    if cfg.num_nextn_predict_layers:
        notes.append(f"{cfg.num_nextn_predict_layers} MTP layer(s) ({w.mtp_params / 1e9:.1f}B params with the embed "
                     "copy and head) are on disk but not loaded by moecluster: not counted in the weights")
    if r.ep > 1 and (w.n_routed_experts + config.redundant_experts) % r.ep:
        notes.append(f"{w.n_routed_experts + config.redundant_experts} expert slots do not divide by EP {r.ep}: "
                     f"the fullest rank holds {r.experts_per_rank}")
    if config.total_gpus % r.ep:
        notes.append(f"{config.total_gpus % r.ep} GPU(s) of the cluster are left over at EP {r.ep}")
    if config.kv_dtype == "fp8":
        notes.append("fp8 cache counted at 1 B per value: a what-if, the engine keeps its cache in the model's "
                     "dtype (bf16); FlashMLA's FP8 layout (bf16 rope + scales) takes 656 B per layer instead of 576")
    return notes
