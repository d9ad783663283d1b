"""A pool of identical replicas in one role (prefill, decode, or colocated "both").

Slots hold a live `Replica` or None while it is being rebuilt. Replicas are named `{pool}-{i}`
(their actors `{pool}-{i}-rank-{r}`). Placement inside the pool is least-open-requests among the
healthy replicas that are not draining; the router's policies (cache-aware, session) choose above
this. The autoscaler grows a pool with `add` and shrinks it with `drain`: a draining replica takes
no new requests, and once its open requests are done `reap` shuts it down and retires its slot
(the health monitor does not rebuild retired slots).
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
        self.draining: set[int] = set()
        self.retired: set[int] = set()

    def start(self) -> None:
        """Build every replica (each placement group, actors and process group)."""
        self.replicas = [self.build(i) for i in range(self.spec.replicas)]

    def build(self, index: int) -> Replica:
        return Replica(f"{self.name}-{index}", self.cfg, self.spec.ep, self.spec.device,
                       role=self.role, listener=self.listener)

    def healthy(self) -> list[tuple[int, Replica]]:
        """Replicas that take new requests: alive, not draining."""
        return [(i, r) for i, r in enumerate(self.replicas)
                if r is not None and r.healthy and i not in self.draining]

    @property
    def size(self) -> int:
        """Replicas that count toward the pool's size: every slot not retired and not draining."""
        return sum(1 for i in range(len(self.replicas)) if i not in self.retired and i not in self.draining)

    def add(self) -> int:
        """Build one more replica (reusing a retired slot); its index."""
        index = min(self.retired) if self.retired else len(self.replicas)
        replica = self.build(index)
        if index == len(self.replicas):
            self.replicas.append(replica)
        else:
            self.replicas[index] = replica
        self.retired.discard(index)
        return index

    def drain(self) -> int | None:
        """Stop placing requests on the least-loaded serving replica; its index (None: none left)."""
        serving = self.healthy()
        if len(serving) <= 1:
            return None
        index, _ = min(serving, key=lambda ir: (ir[1].streams.open_requests(), -ir[0]))
        self.draining.add(index)
        return index

    def reap(self) -> list[int]:
        """Shut down draining replicas whose requests are all done; the slots retired."""
        done = []
        for index in sorted(self.draining):
            replica = self.replicas[index]
            if replica is None or replica.streams.open_requests() == 0:
                if replica is not None:
                    replica.shutdown()
                self.replicas[index] = None
                self.draining.discard(index)
                self.retired.add(index)
                done.append(index)
        return done

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
             "draining": i in self.draining, "ranks": r.health() if r is not None else []}
            for i, r in enumerate(self.replicas) if i not in self.retired
        ]

    def step_profiles(self, clear: bool = False) -> dict[str, list[dict[str, Any]]]:
        """Per live replica (named as in `status`), each rank's per-phase step times."""
        return {f"{self.name}-{i}": r.step_profiles(clear)
                for i, r in enumerate(self.replicas) if r is not None and i not in self.retired}

    def shutdown(self) -> None:
        for r in self.replicas:
            if r is not None:
                r.shutdown()
        self.replicas = [None] * len(self.replicas)
