"""One replica on Ray: an expert-parallel group of rank actors in one placement group.

Bundles: one per rank ({"GPU": 1, "CPU": 1} on cuda, {"CPU": 1} on cpu). A group that fits one
node (at most `gpus_per_node` ranks) is STRICT_PACK-ed onto it; a larger one is PACK-ed over as
few nodes as possible. Actors are named `{pool}-{index}-rank-{r}` in the `moecluster` namespace so
the Ray dashboard shows them. The replica exposes the engine interface (check, submit with a
sink, abort) and forwards each rank's events to the requests' sinks from one poller thread per
rank; if a rank's actor dies, every open request of the replica fails with the reason (the
cluster's failover moves them elsewhere). A prefill replica reports the handoffs its ranks make,
and a decode replica the handoffs its ranks took, to the `listener` (the deployment routes them).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moecluster.cluster.rank_actor import RankActor
from moecluster.workers.engine.async_engine import Sink
from moecluster.workers.engine.engine_config import EngineConfig
from moecluster.workers.engine.engine_core import Role
from moecluster.workers.engine.rank_streams import RankStreams
from moecluster.workers.engine.request_limits import RequestLimits
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.transfer.handoff import KVHandoff

log = logging.getLogger(__name__)

NAMESPACE = "moecluster"


class Replica:
    def __init__(
        self,
        name: str,
        cfg: EngineConfig,
        ep: int,
        device: str,
        gpus_per_node: int = 8,
        start_timeout: float = 600.0,
        role: Role = "both",
        listener: Callable[[Replica, str, int, Any], None] | None = None,
    ) -> None:
        self.name, self.ep, self.role = name, ep, role
        bundle = {"GPU": 1, "CPU": 1} if device == "cuda" else {"CPU": 1}
        strategy = "STRICT_PACK" if ep <= gpus_per_node else "PACK"
        self.pg = placement_group([dict(bundle) for _ in range(ep)], strategy=strategy, name=f"{name}-pg")
        ready, _ = ray.wait([self.pg.ready()], timeout=start_timeout)
        if not ready:
            remove_placement_group(self.pg)
            raise TimeoutError(f"{name}: the cluster has no room for {ep} x {bundle} ({strategy})")
        try:
            self._start_actors(cfg, ep, device, role, start_timeout)
        except BaseException:
            for a in getattr(self, "actors", []):  # a group that did not come up gives its resources back
                ray.kill(a)
            remove_placement_group(self.pg)
            raise
        hear = None if listener is None else (lambda kind, rank, payload: listener(self, kind, rank, payload))
        self.streams = RankStreams(ep, f"replica {name}", hear)
        self._pollers = [
            threading.Thread(target=self._poll, args=(r,), name=f"{name}-poll-{r}", daemon=True) for r in range(ep)
        ]
        for t in self._pollers:
            t.start()

    def _start_actors(self, cfg: EngineConfig, ep: int, device: str, role: Role, start_timeout: float) -> None:
        name = self.name
        actor = ray.remote(RankActor)
        self.actors = [
            actor.options(
                name=f"{name}-rank-{r}",
                namespace=NAMESPACE,
                num_cpus=1,
                num_gpus=1 if device == "cuda" else 0,
                max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(cfg, r, ep, name, role)
            for r in range(ep)
        ]
        addr, port = ray.get(self.actors[0].address.remote(), timeout=start_timeout)
        limits: list[RequestLimits] = ray.get([a.start.remote(addr, port) for a in self.actors], timeout=start_timeout)
        self.limits = limits[0]

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        return self.limits.check(prompt_ids, params)

    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink, prompt: str | None = None,
        rank: int | None = None,
    ) -> None:
        """Queue a request on `rank` (default: the rank with the fewest open requests)."""
        self.check(prompt_ids, params)
        rank = self.streams.open(request_id, sink, rank)
        self.actors[rank].submit.remote(request_id, list(prompt_ids), params, prompt)

    def submit_prefilled(self, inner_id: str, handoff: KVHandoff, sink: Sink) -> None:
        """A decode replica: continue a handed-over sample as `inner_id` on its least-loaded rank."""
        rank = self.streams.open(inner_id, sink)
        self.actors[rank].submit_prefilled.remote(inner_id, handoff)

    def ack(self, rank: int, request_id: str, sample_index: int) -> None:
        """A prefill replica: rank `rank` may free the blocks it staged for this sample."""
        try:
            self.actors[rank].ack.remote(request_id, sample_index)
        except ray.exceptions.RayError:
            pass  # that rank is gone, and its blocks with it

    def abort(self, request_id: str) -> None:
        rank = self.streams.owner(request_id)
        if rank is not None:
            self.actors[rank].abort.remote(request_id)

    def rebalance(self) -> None:
        for a in self.actors:
            a.rebalance.remote()

    @property
    def healthy(self) -> bool:
        return self.streams.error is None

    def health(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Each rank's liveness and engine stats (a dead actor reads as not alive)."""
        out = []
        for r, a in enumerate(self.actors):
            try:
                out.append(ray.get(a.health.remote(), timeout=timeout))
            except (ray.exceptions.RayError, TimeoutError) as e:
                out.append({"rank": r, "alive": False, "error": repr(e)})
        return out

    def step_profiles(self, clear: bool = False, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Each rank's per-phase step times (empty for a rank that does not answer)."""
        refs = [a.step_profile.remote(clear) for a in self.actors]
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=timeout))
            except (ray.exceptions.RayError, TimeoutError):
                out.append({})
        return out

    def _poll(self, rank: int) -> None:
        actor = self.actors[rank]
        while self.streams.error is None:
            try:
                events = ray.get(actor.poll.remote(0.05))
            except ray.exceptions.RayError as e:
                self.streams.fail(f"rank {rank} actor is gone ({type(e).__name__})")
                return
            for event in events:
                try:
                    self.streams.handle(event)
                except Exception as e:  # noqa: BLE001 - never die silently: fail the replica, its streams move
                    log.exception("replica %s: handling %s from rank %d failed", self.name, event[0], rank)
                    self.streams.fail(f"event handling failed: {e!r}")
                    return

    def shutdown(self, timeout: float = 30.0) -> None:
        self.streams.fail("shut down")
        stops = [a.stop.remote() for a in self.actors]
        deadline = time.time() + timeout
        for ref in stops:
            try:
                ray.get(ref, timeout=max(0.1, deadline - time.time()))
            except (ray.exceptions.RayError, TimeoutError):
                pass
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)
