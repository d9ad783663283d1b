"""A pool of identical replicas in one role (prefill, decode, or colocated "both").

Slots hold a live `Replica` or None while it is being rebuilt. Replicas are named `{pool}-{i}`
(their actors `{pool}-{i}-rank-{r}`). Placement inside the pool is least-open-requests among the
healthy replicas; the router's policies (cache-aware, session) choose above this.
"""

from __future__ import annotations

from typing import Any, Callable

from moecluster.cluster.replica import Replica
from moecluster.cluster.spec import PoolSpec
from moecluster.workers.engine.engine_config import EngineConfig
from moecluster.workers.engine.engine_core import Role

Listener = Callable[[Replica, str, int, Any], None]


class Pool:
    def __init__(self, name: str, spec: PoolSpec, cfg: EngineConfig, role: Role, listener: Listener | None = None) -> None:
        self.name, self.spec, self.cfg, self.role, self.listener = name, spec, cfg, role, listener
        self.replicas: list[Replica | None] = []

    def start(self) -> None:
        """Build every replica (each placement group, actors and process group)."""
        self.replicas = [self.build(i) for i in range(self.spec.replicas)]

    def build(self, index: int) -> Replica:
        return Replica(f"{self.name}-{index}", self.cfg, self.spec.ep, self.spec.device,
                       role=self.role, listener=self.listener)

    def healthy(self) -> list[tuple[int, Replica]]:
        return [(i, r) for i, r in enumerate(self.replicas) if r is not None and r.healthy]

    def named(self, name: str) -> tuple[int, Replica] | None:
        """The replica called `name`, if it is healthy."""
        return next(((i, r) for i, r in self.healthy() if r.name == name), None)

    def least_loaded(self) -> tuple[int, Replica] | None:
        healthy = self.healthy()
        if not healthy:
            return None
        return min(healthy, key=lambda ir: (ir[1].streams.open_requests(), ir[0]))

    def status(self) -> list[dict[str, Any]]:
        return [
            {"name": f"{self.name}-{i}", "role": self.role, "healthy": r is not None and r.healthy,
             "ranks": r.health() if r is not None else []}
            for i, r in enumerate(self.replicas)
        ]

    def shutdown(self) -> None:
        for r in self.replicas:
            if r is not None:
                r.shutdown()
        self.replicas = [None] * len(self.replicas)
