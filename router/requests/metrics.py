"""The router's own Prometheus metrics (prometheus_client, a private registry), served on /metrics.

Requests by protocol and outcome, time to first token and end-to-end latency as the router sees
them, and requests in flight. Engine-side metrics (KV blocks, queues, expert imbalance) are
published by the rank actors through Ray's metrics and scraped from Ray.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RouterMetrics:
    def __init__(self, open_requests: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("moecluster_router_requests", "requests by protocol and outcome",
                                ("protocol", "outcome"), registry=self.registry)
        self.ttft = Histogram("moecluster_router_ttft_seconds", "time to first token at the router",
                              ("protocol",), buckets=BUCKETS_S, registry=self.registry)
        self.latency = Histogram("moecluster_router_request_seconds", "request duration at the router",
                                 ("protocol",), buckets=BUCKETS_S, registry=self.registry)
        self.in_flight = Gauge("moecluster_router_in_flight", "requests being served", registry=self.registry)
        if open_requests is not None:
            self.in_flight.set_function(open_requests)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
