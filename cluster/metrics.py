"""Serving metrics through `ray.util.metrics`: they appear in the Ray dashboard and on Ray's
Prometheus endpoint (names prefixed `ray_moecluster_` there).

Two sources. Each rank actor publishes its engine's state (`publish_engine_stats`): running and
waiting sequences, KV blocks used / free, prefix-cache hit rate, preemptions, and the expert load
imbalance after an EPLB rebalance. The deployment measures what clients see
(`RequestTimer`): time to first token, inter-token latency, queue time until the first token,
finished requests by reason, failovers, and KV transfers between the prefill and decode pools
(received, or refilled when the transfer failed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class MetricsBackend(Protocol):
    def gauge(self, name: str, value: float, tags: dict[str, str]) -> None: ...

    def count(self, name: str, value: float, tags: dict[str, str]) -> None: ...

    def observe(self, name: str, value: float, tags: dict[str, str]) -> None: ...


DESCRIPTIONS = {
    "moecluster_running_seqs": "sequences running on a rank",
    "moecluster_waiting_seqs": "sequences queued on a rank",
    "moecluster_kv_blocks_used": "latent-cache blocks referenced on a rank",
    "moecluster_kv_blocks_free": "latent-cache blocks free on a rank",
    "moecluster_prefix_hit_rate": "prompt tokens found in the prefix cache / looked up",
    "moecluster_preemptions_total": "sequences preempted (recomputed) on a rank",
    "moecluster_expert_imbalance": "max / mean tokens per rank after the last EPLB rebalance",
    "moecluster_requests_total": "requests finished, by finish reason",
    "moecluster_failovers_total": "streams moved to another replica after a failure",
    "moecluster_kv_transfers_total": "prefilled samples handed to a decode replica, by outcome",
    "moecluster_ttft_seconds": "time to first token",
    "moecluster_queue_seconds": "time a sequence waited on its rank before its first scheduled step",
    "moecluster_itl_seconds": "time between consecutive tokens of a stream",
}
HISTOGRAMS = {"moecluster_ttft_seconds", "moecluster_itl_seconds", "moecluster_queue_seconds"}
COUNTERS = {
    "moecluster_requests_total", "moecluster_failovers_total", "moecluster_preemptions_total",
    "moecluster_kv_transfers_total",
}


class RayMetrics:
    """The real backend: ray.util.metrics objects, created on first use with the tag keys seen."""

    def __init__(self) -> None:
        self._metrics: dict[str, Any] = {}

    def _get(self, name: str, tags: dict[str, str]) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            from ray.util import metrics

            keys = tuple(sorted(tags))
            if name in HISTOGRAMS:
                metric = metrics.Histogram(name, DESCRIPTIONS[name], boundaries=LATENCY_BUCKETS_S, tag_keys=keys)
            elif name in COUNTERS:
                metric = metrics.Counter(name, DESCRIPTIONS[name], tag_keys=keys)
            else:
                metric = metrics.Gauge(name, DESCRIPTIONS[name], tag_keys=keys)
            self._metrics[name] = metric
        return metric

    def gauge(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._get(name, tags).set(value, tags=tags)

    def count(self, name: str, value: float, tags: dict[str, str]) -> None:
        if value > 0:
            self._get(name, tags).inc(value, tags=tags)

    def observe(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._get(name, tags).observe(value, tags=tags)


def publish_engine_stats(backend: MetricsBackend, stats: Any, tags: dict[str, str], last_preemptions: int) -> int:
    """Set a rank's gauges from its EngineStats; returns the preemption count to diff against next time."""
    used = stats.num_blocks - stats.num_free_blocks
    backend.gauge("moecluster_running_seqs", stats.num_running, tags)
    backend.gauge("moecluster_waiting_seqs", stats.num_waiting, tags)
    backend.gauge("moecluster_kv_blocks_used", used, tags)
    backend.gauge("moecluster_kv_blocks_free", stats.num_free_blocks, tags)
    backend.gauge("moecluster_prefix_hit_rate", stats.prefix_hit_rate, tags)
    backend.count("moecluster_preemptions_total", stats.num_preemptions - last_preemptions, tags)
    return stats.num_preemptions


@dataclass
class RequestTimer:
    """Client-side timings of one stream."""

    backend: MetricsBackend
    tags: dict[str, str]
    start: float = field(default_factory=time.perf_counter)
    last: float | None = None
    observer: Callable[[str, float], None] | None = None  # also told ("ttft" | "itl", seconds), e.g. the autoscaler

    def on_tokens(self, count: int) -> None:
        now = time.perf_counter()
        if count <= 0:
            return
        if self.last is None:
            signal, value = "ttft", now - self.start
            self.backend.observe("moecluster_ttft_seconds", value, self.tags)
        else:
            signal, value = "itl", (now - self.last) / count
            self.backend.observe("moecluster_itl_seconds", value, self.tags)
        if self.observer is not None:
            self.observer(signal, value)
        self.last = now

    def on_finish(self, reason: str) -> None:
        self.backend.count("moecluster_requests_total", 1, {**self.tags, "finish_reason": reason})
