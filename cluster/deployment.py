"""A deployment on Ray from a spec: replicas, health checks, failover with resumed streams.

Colocated serving (no prefill pool): every decode replica prefills its own requests. A request
goes to the healthy replica with the fewest open requests. A monitor checks every replica's ranks;
when a rank dies the whole replica is torn down and rebuilt (a collective group cannot lose one
member). Its in-flight requests do not fail: each stream remembers the tokens it has delivered,
and when its replica fails it is resubmitted to a healthy replica as prompt + those tokens with
the remaining budget, so the client's stream continues with nothing lost and nothing repeated.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from moecluster.cluster.metrics import RayMetrics, RequestTimer
from moecluster.cluster.replica import Replica
from moecluster.cluster.spec import DeploymentSpec, PoolSpec
from moecluster.workers.engine.async_engine import EngineDead, Sink, _notify
from moecluster.workers.engine.engine_config import EngineConfig
from moecluster.workers.engine.outputs import RequestOutput
from moecluster.workers.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def engine_config(spec: DeploymentSpec, pool: PoolSpec) -> EngineConfig:
    e, c = spec.engine, spec.cache
    return EngineConfig(
        model=spec.model, dtype=e.dtype, device=pool.device, trust_remote_code=spec.trust_remote_code,
        block_size=c.block_size, num_kv_blocks=c.num_blocks, kv_cache_memory_bytes=c.memory_bytes,
        gpu_memory_utilization=c.memory_fraction, max_model_len=e.max_model_len, max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens, enable_chunked_prefill=e.enable_chunked_prefill,
        enable_prefix_caching=c.enable_prefix_caching, eplb_redundant_slots=e.eplb_redundant_slots,
        eplb_interval_steps=e.eplb_interval_steps,
    )


@dataclass
class _Stream:
    """One client request across replicas: what it has delivered so far."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    prompt: str | None
    timer: RequestTimer
    delivered: list[int] = field(default_factory=list)
    attempts: int = 0


class Deployment:
    def __init__(self, spec: DeploymentSpec, health_interval_s: float = 1.0) -> None:
        if spec.prefill is not None:
            raise NotImplementedError("a separate prefill pool on Ray is not implemented yet; omit `prefill` (colocated)")
        self.spec, self.pool = spec, spec.decode
        self.cfg = engine_config(spec, self.pool)
        self.replicas: list[Replica | None] = [self._build(i) for i in range(self.pool.replicas)]
        self.limits = next(r for r in self.replicas if r is not None).limits
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._where: dict[str, int] = {}
        self._stop = threading.Event()
        self.failovers = 0
        self.metrics = RayMetrics()
        self.tags = {"model": spec.served_name or ""}
        self._monitor = threading.Thread(target=self._watch, args=(health_interval_s,), name="moecluster-health", daemon=True)
        self._monitor.start()

    def _build(self, index: int) -> Replica:
        return Replica(f"decode-{index}", self.cfg, self.pool.ep, self.pool.device)

    # ---- requests ------------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        return self.limits.check(prompt_ids, params)

    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink, prompt: str | None = None
    ) -> None:
        self.check(prompt_ids, params)
        stream = _Stream(request_id, list(prompt_ids), params, sink, prompt, RequestTimer(self.metrics, self.tags))
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
        self._place(stream)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            index = self._where.pop(request_id, None)
        replica = self.replicas[index] if index is not None else None
        if replica is not None:
            replica.abort(request_id)

    def _place(self, stream: _Stream) -> None:
        """Submit (or resubmit) a stream to the healthy replica with the fewest open requests."""
        left = None if stream.params.max_tokens is None else stream.params.max_tokens - len(stream.delivered)
        params = stream.params if not stream.delivered else stream.params.model_copy(update={"max_tokens": left})
        while True:
            healthy = [(r.streams.open_requests(), i) for i, r in enumerate(self.replicas) if r is not None and r.healthy]
            if not healthy:
                if self._stop.is_set():
                    _notify(stream.sink, EngineDead("the deployment is shut down"))
                    return
                time.sleep(0.2)  # every replica is being rebuilt: wait, the request is kept
                continue
            index = min(healthy)[1]
            replica = self.replicas[index]
            assert replica is not None
            with self._lock:
                self._where[stream.request_id] = index
            try:
                replica.submit(stream.request_id, stream.prompt_ids + stream.delivered, params,
                               lambda item, s=stream: self._on_item(s, item), stream.prompt)
                return
            except EngineDead:
                continue  # it failed between the health look and the submit: try another

    def _on_item(self, stream: _Stream, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            if stream.params.n == 1 and not isinstance(item, ValueError) and not self._stop.is_set():
                stream.attempts += 1
                self.failovers += 1
                self.metrics.count("moecluster_failovers_total", 1, self.tags)
                log.warning("request %s: replica failed (%s); resuming after %d tokens",
                            stream.request_id, item, len(stream.delivered))
                threading.Thread(target=self._place, args=(stream,), daemon=True).start()
                return
            self._finish(stream)
            _notify(stream.sink, item)
            return
        for o in item.outputs:
            if stream.params.n == 1:
                stream.delivered += o.token_ids
        stream.timer.on_tokens(sum(len(o.token_ids) for o in item.outputs))
        item.prompt_token_ids = stream.prompt_ids
        if item.finished:
            self._finish(stream)
            stream.timer.on_finish(next((o.finish_reason for o in item.outputs if o.finish_reason), "stop"))
        _notify(stream.sink, item)

    def _finish(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.pop(stream.request_id, None)
            self._where.pop(stream.request_id, None)

    # ---- health and failover -------------------------------------------------------------------
    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for i, replica in enumerate(self.replicas):
                if replica is not None:
                    if replica.healthy and all(h["alive"] for h in replica.health(timeout=interval * 5)):
                        continue
                    log.warning("replica %s is unhealthy: rebuilding it", replica.name)
                    replica.streams.fail("a rank is dead")  # its streams resume elsewhere
                    self.replicas[i] = None
                    replica.shutdown(timeout=5.0)
                try:
                    self.replicas[i] = self._build(i)
                except Exception as e:  # noqa: BLE001 - keep serving on the others, retry next round
                    log.error("rebuilding replica decode-%d failed: %r", i, e)

    def status(self) -> list[dict]:
        return [
            {"name": f"decode-{i}", "healthy": r is not None and r.healthy,
             "ranks": r.health() if r is not None else []}
            for i, r in enumerate(self.replicas)
        ]

    def shutdown(self) -> None:
        self._stop.set()
        self._monitor.join(10)
        for r in self.replicas:
            if r is not None:
                r.shutdown()
