"""`moecluster plan`: per-GPU memory arithmetic for serving one model with data-parallel
attention and expert parallelism on H100 / H200 nodes.

`weights.py` counts parameters and bytes per component from the config's shapes and formats,
`memory.py` turns them into one rank's memory (capacity - weights - headroom = latent cache),
`planner.py` picks the smallest layouts and words the verdict, `render.py` prints it.
"""

from moecluster.cluster.plan.memory import GPUS, GpuSpec, PlanConfig, RankMemory, candidate_eps, rank_memory
from moecluster.cluster.plan.planner import Plan, make_plan
from moecluster.cluster.plan.presets import PRESETS, resolve_model
from moecluster.cluster.plan.render import plan_to_dict, print_plan
from moecluster.cluster.plan.weights import Component, WeightBreakdown, kv_bytes_per_token, weight_breakdown

__all__ = [
    "GPUS",
    "PRESETS",
    "Component",
    "GpuSpec",
    "Plan",
    "PlanConfig",
    "RankMemory",
    "WeightBreakdown",
    "candidate_eps",
    "kv_bytes_per_token",
    "make_plan",
    "plan_to_dict",
    "print_plan",
    "rank_memory",
    "resolve_model",
    "weight_breakdown",
]
