"""Per-GPU memory of one EP rank, and the search for the smallest layout that serves a context.

Layout: data-parallel attention, expert parallelism over every GPU of one replica. Every rank
holds the replicated weights (attention, norms, dense layers, router gates, shared experts,
embedding, lm_head, MLA's absorbed copies) and ceil(expert slots / EP) routed experts of every
MoE layer; its latent cache holds only its own sequences, so a sequence must fit on one rank.

    KV bytes per rank = capacity - replicated - routed share - headroom
    headroom          = (1 - memory_fraction) * capacity + reserve + activations(max_batched_tokens, context)

which is how the engine sizes its cache (`workers/engine/engine_config.py`): the free memory after
the weights, less the share of the GPU the memory fraction keeps back (0.9 by default, as the
spec's `cache.memory_fraction`: CUDA graphs, NCCL's buffers and the allocator work in it), less one
full step's activations (`workers/engine/kv_cache.activation_bytes`, the engine's own count: the
routed copies of a prefill chunk, and the keys and values its attention expands, up to MLA's
context segment). The reserve (default 3 GiB) is what is already in use when the engine measures
the free memory: the CUDA context and the cached blocks of loading. Served on an H200 (full-depth
rank proxies, `docs/performance.md`, session 18), the engine's cache came out 0.6 GiB
(K2-Thinking, 0.7 at a 131K context) and 2.1 GiB (DeepSeek-V3) larger than this count with a
3 GiB reserve.
KV tokens are counted in whole blocks (block_size, default 64 as the engine's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moecluster.cluster.plan.weights import KV_DTYPE_BYTES, WeightBreakdown, cdiv

MiB, GiB = 1 << 20, 1 << 30
MAX_SEARCH_NODES = 64  # the layout search looks this far beyond the given cluster


@dataclass(frozen=True)
class GpuSpec:
    name: str
    label: str
    capacity_bytes: int  # what the CUDA allocator can have in total
    source: str


GPUS = {
    "h100": GpuSpec("h100", "H100 80GB HBM3", 81_079 * MiB,
                    "torch total_memory 85,017,493,504 B = 81,079 MiB, measured on the lent H100 "
                    "(nvidia-smi: 81,559 MiB less 480 MiB reserved by the driver)"),
    "h200": GpuSpec("h200", "H200 141GB HBM3e", 143_155 * MiB,
                    "nvidia-smi 143,771 MiB less about 0.6 GiB reserved by the driver = 139.8 GiB "
                    "(the reservation estimated, not measured here)"),
}


@dataclass(frozen=True)
class PlanConfig:
    """What to plan for; validated on construction."""

    gpu: str
    gpus_per_node: int = 8
    nodes: int = 1
    context: int | None = None  # tokens per sequence; default: the model's max_position_embeddings
    ep: int | None = None  # default: every GPU of the cluster in one replica
    kv_dtype: str = "bf16"
    block_size: int = 64
    max_batched_tokens: int = 8192
    reserve_gib: float = 3.0
    memory_fraction: float = 0.9  # the spec's cache.memory_fraction
    redundant_experts: int = 0  # EPLB slots for replicas of hot experts, over the whole replica
    comfortable_seqs: int = 32  # per replica, for the "comfortable" layout

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu", self.gpu.lower())
        if self.gpu not in GPUS:
            raise ValueError(f"unknown GPU {self.gpu!r}; choose one of {', '.join(GPUS)}")
        if self.kv_dtype not in KV_DTYPE_BYTES:
            raise ValueError(f"unknown --kv-dtype {self.kv_dtype!r}; choose one of {', '.join(KV_DTYPE_BYTES)}")
        positive = {"--gpus-per-node": self.gpus_per_node, "--nodes": self.nodes, "block_size": self.block_size,
                    "--max-batched-tokens": self.max_batched_tokens, "comfortable_seqs": self.comfortable_seqs}
        if self.context is not None:
            positive["--context"] = self.context
        if self.ep is not None:
            positive["--ep"] = self.ep
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.ep is not None and self.ep > self.total_gpus:
            raise ValueError(f"--ep {self.ep} exceeds the {self.total_gpus} GPUs of {self.nodes} node(s)")
        if not math.isfinite(self.reserve_gib):
            raise ValueError(f"--reserve-gib must be a finite number of GiB, got {self.reserve_gib}")
        if self.reserve_gib < 0 or self.redundant_experts < 0:
            raise ValueError("--reserve-gib and --redundant-experts must not be negative")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"--memory-fraction must be in (0, 1], got {self.memory_fraction}")

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def spec(self) -> GpuSpec:
        return GPUS[self.gpu]


@dataclass(frozen=True)
class RankMemory:
    """One EP rank of a replica of `ep` GPUs."""

    ep: int
    experts_per_rank: int  # routed expert slots per MoE layer on the fullest rank
    capacity_bytes: int
    replicated_bytes: int
    routed_bytes: int
    headroom_bytes: int
    kv_bytes: int  # negative when weights + headroom exceed the capacity
    kv_tokens: int  # whole blocks
    seqs_per_gpu: int  # full-context sequences
    replicas: int  # replicas of this size on the given cluster (0: the cluster is too small)

    @property
    def weights_bytes(self) -> int:
        return self.replicated_bytes + self.routed_bytes

    @property
    def fits(self) -> bool:
        return self.kv_bytes >= 0

    @property
    def seqs_per_replica(self) -> int:
        return self.seqs_per_gpu * self.ep


def headroom_bytes(cfg: PlanConfig, activation_bytes: int) -> int:
    """What the engine keeps out of the cache beside the weights (`activation_bytes`: one step's)."""
    held_back = round((1 - cfg.memory_fraction) * cfg.spec.capacity_bytes)
    return held_back + round(cfg.reserve_gib * GiB) + activation_bytes


def rank_memory(w: WeightBreakdown, cfg: PlanConfig, ep: int, activation_bytes: int, kv_per_token: int,
                context: int) -> RankMemory:
    slots = w.n_routed_experts + cfg.redundant_experts
    experts = cdiv(slots, ep) if slots else 0
    routed = experts * w.expert_slot_bytes
    headroom = headroom_bytes(cfg, activation_bytes)
    capacity = cfg.spec.capacity_bytes
    kv = capacity - w.replicated_bytes - routed - headroom
    blocks = max(kv, 0) // (cfg.block_size * kv_per_token)
    seqs = blocks // cdiv(context, cfg.block_size)
    return RankMemory(ep, experts, capacity, w.replicated_bytes, routed, headroom, kv, blocks * cfg.block_size, seqs,
                      cfg.total_gpus // ep)


def candidate_eps(gpus_per_node: int, max_nodes: int = MAX_SEARCH_NODES) -> list[int]:
    """Powers of two inside one node, then whole nodes."""
    eps, p = [], 1
    while p < gpus_per_node:
        eps.append(p)
        p *= 2
    return eps + [gpus_per_node * n for n in range(1, max_nodes + 1)]


def smallest(w: WeightBreakdown, cfg: PlanConfig, activation_bytes: int, kv_per_token: int, context: int,
             min_seqs_per_replica: int) -> RankMemory | None:
    """The smallest EP whose every rank holds one full sequence and whose replica holds min_seqs."""
    for ep in candidate_eps(cfg.gpus_per_node, max(MAX_SEARCH_NODES, cfg.nodes)):
        r = rank_memory(w, cfg, ep, activation_bytes, kv_per_token, context)
        if r.seqs_per_gpu >= 1 and r.seqs_per_replica >= min_seqs_per_replica:
            return r
    return None
