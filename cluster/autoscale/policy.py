"""Autoscaling policies: small objects that turn one interval's pool metrics into replica counts.

A policy sees a `PoolMetrics` per pool (what the deployment measured over the last interval) and
returns the replica count it wants for each; the controller clamps to the pool's bounds, applies
the cooldown and carries the change out (scale-up adds placement groups, scale-down drains).

The default `SLOPolicy`:
- prefill pool (or the colocated pool): up when p90 queue time or p90 TTFT exceeds its target;
- decode pool: up when p90 inter-token latency exceeds its target or KV-cache use passes kv_high;
- down by one when every signal of the pool has stayed below `low_fraction` of its target (and KV
  use below kv_low) for `down_intervals` consecutive intervals: hysteresis, so a pool does not
  flap around a threshold; an idle pool (no requests) counts as low.
Scale-up adds ceil(replicas x (worst ratio - 1)), at least one: a pool far over target grows fast.

A user policy is any class with `decide(metrics, replicas) -> dict[str, int]`, named in the spec as
`module.sub:Class` and constructed with the spec's `autoscaling.options` as keyword arguments.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from moecluster.cluster.spec import AutoscalingSpec, SLOTargets


@dataclass(frozen=True)
class PoolMetrics:
    """One pool over one interval. Latencies in seconds; None: no sample this interval."""

    pool: str  # "prefill" | "decode"
    role: str  # "prefill" | "decode" | "both" (colocated)
    replicas: int  # serving now (draining ones excluded)
    requests: int = 0  # requests that finished or produced tokens this interval
    ttft_p90: float | None = None
    queue_p90: float | None = None
    itl_p90: float | None = None
    kv_usage: float = 0.0  # mean over the pool's ranks, 0..1
    waiting: int = 0  # sequences queued on the pool's ranks now


class AutoscalePolicy(Protocol):
    def decide(self, metrics: Mapping[str, PoolMetrics], replicas: Mapping[str, int]) -> dict[str, int]: ...


@dataclass
class SLOPolicy:
    targets: SLOTargets = field(default_factory=SLOTargets)
    _low_streak: dict[str, int] = field(default_factory=dict)

    def decide(self, metrics: Mapping[str, PoolMetrics], replicas: Mapping[str, int]) -> dict[str, int]:
        return {name: self._decide_pool(m, replicas.get(name, m.replicas)) for name, m in metrics.items()}

    def _latency_ratios(self, m: PoolMetrics) -> list[float]:
        """Each latency signal of the pool over its target (> 1: violated)."""
        t = self.targets
        ratios = []
        if m.role in ("prefill", "both"):
            ratios += [_ratio(m.queue_p90, t.queue_s), _ratio(m.ttft_p90, t.ttft_s)]
        if m.role in ("decode", "both"):
            ratios.append(_ratio(m.itl_p90, t.itl_s))
        return ratios

    def _decide_pool(self, m: PoolMetrics, current: int) -> int:
        t = self.targets
        latency = self._latency_ratios(m)
        kv = m.kv_usage / t.kv_high if m.role != "prefill" else 0.0
        worst = max([*latency, kv])
        if current == 0:
            return 1 if (m.requests or m.waiting) else 0
        if worst > 1.0:
            self._low_streak[m.pool] = 0
            return current + max(1, math.ceil(current * (worst - 1.0)))
        low = all(r < t.low_fraction for r in latency) and (m.role == "prefill" or m.kv_usage < t.kv_low)
        if low and m.waiting == 0:
            self._low_streak[m.pool] = self._low_streak.get(m.pool, 0) + 1
            if self._low_streak[m.pool] >= t.down_intervals:
                self._low_streak[m.pool] = 0
                return current - 1
        else:
            self._low_streak[m.pool] = 0
        return current


def _ratio(value: float | None, target: float) -> float:
    return 0.0 if value is None else value / target


def load_policy(spec: AutoscalingSpec) -> AutoscalePolicy:
    """The spec's policy: "slo", or a user class path constructed with `options`."""
    if spec.policy == "slo":
        if spec.options:
            raise ValueError(f"autoscaling.options: the slo policy takes its settings from autoscaling.targets, got {sorted(spec.options)}")
        return SLOPolicy(spec.targets)
    module_name, _, class_name = spec.policy.partition(":")
    try:
        cls: Any = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"autoscaling.policy: cannot load {spec.policy!r}: {e}") from None
    try:
        policy = cls(**spec.options)
    except TypeError as e:
        raise ValueError(f"autoscaling.options: {spec.policy} rejected them: {e}") from None
    if not callable(getattr(policy, "decide", None)):
        raise ValueError(f"autoscaling.policy: {spec.policy} has no decide(metrics, replicas) method")
    return policy
