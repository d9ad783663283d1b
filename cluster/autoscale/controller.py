"""The live autoscaler: every interval, measure each pool, ask the policy, resize within bounds.

Signals per pool over the last interval: p90 TTFT (the entry pool) and p90 inter-token latency
(the decode pool) from the deployment's client-side timings, p90 queue time and mean KV use and
waiting sequences from the ranks' health reports. Decisions are clamped to the spec's
`autoscaling.<pool>` bounds (a pool without bounds keeps its size) and a pool changes at most once
per `cooldown_s`. Scale-up builds placement groups and actors (on KubeRay, Ray's autoscaler turns
the resource request into pods). Scale-down drains: the replica takes no new requests and is shut
down once its open requests have finished; nothing is cut off.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from moecluster.cluster.autoscale.policy import AutoscalePolicy, PoolMetrics, load_policy
from moecluster.cluster.deployment import Deployment
from moecluster.cluster.pool import Pool
from moecluster.cluster.spec import AutoscalingSpec, ScaleBounds

log = logging.getLogger(__name__)


@dataclass
class ScaleEvent:
    at: float  # time.time()
    pool: str
    before: int
    after: int
    reason: str


@dataclass
class Autoscaler:
    deployment: Deployment
    spec: AutoscalingSpec
    policy: AutoscalePolicy | None = None
    events: list[ScaleEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.policy = self.policy or load_policy(self.spec)
        self._last_change: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def bounds(self, name: str) -> ScaleBounds | None:
        return getattr(self.spec, name, None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="moecluster-autoscaler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.spec.interval_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a failed round must not stop autoscaling
                log.exception("autoscaler round failed")

    def step(self) -> dict[str, int]:
        """One interval: metrics -> policy -> resize; returns each pool's size afterwards."""
        pools = self.deployment.pools
        for pool in pools.values():
            for index in pool.reap():
                log.warning("autoscaler: %s-%d drained and removed", pool.name, index)
        metrics = {name: self.metrics(name, pool) for name, pool in pools.items()}
        sizes = {name: pool.size for name, pool in pools.items()}
        assert self.policy is not None
        wanted = self.policy.decide(metrics, sizes)
        for name, want in wanted.items():
            if name in pools:
                self._resize(pools[name], sizes[name], want, metrics[name])
        return {name: pool.size for name, pool in pools.items()}

    def metrics(self, name: str, pool: Pool) -> PoolMetrics:
        interval = self.spec.interval_s
        health: list[dict[str, Any]] = []
        for _, replica in pool.healthy():
            health += replica.health()
        stats = [h["stats"] for h in health if h.get("stats") is not None]
        queue = sorted(v for h in health for v in h.get("queue_times", ()))
        window = self.deployment.window
        ttft = window.p90("ttft", name, interval)
        itl = window.p90("itl", name, interval)
        samples = len(window.since("ttft", name, interval)) + len(window.since("itl", name, interval))
        return PoolMetrics(
            pool=name, role=pool.role, replicas=pool.size, requests=samples,
            ttft_p90=ttft, itl_p90=itl, queue_p90=queue[min(len(queue) - 1, int(0.9 * len(queue)))] if queue else None,
            kv_usage=sum(s.kv_usage for s in stats) / len(stats) if stats else 0.0,
            waiting=sum(s.num_waiting for s in stats),
        )

    def _resize(self, pool: Pool, current: int, want: int, m: PoolMetrics) -> None:
        bounds = self.bounds(pool.name)
        if bounds is None:
            return
        want = max(bounds.min_replicas, min(bounds.max_replicas, want))
        if want == current:
            return
        now = time.monotonic()
        if now - self._last_change.get(pool.name, -1e18) < self.spec.cooldown_s:
            return
        self._last_change[pool.name] = now
        reason = (f"ttft p90 {m.ttft_p90}, queue p90 {m.queue_p90}, itl p90 {m.itl_p90}, "
                  f"kv {m.kv_usage:.2f}, waiting {m.waiting}")
        log.warning("autoscaler: %s %d -> %d (%s)", pool.name, current, want, reason)
        self.events.append(ScaleEvent(time.time(), pool.name, current, want, reason))
        for _ in range(want - current):
            pool.add()
        for _ in range(current - want):
            if pool.drain() is None:
                break

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
