"""A deployment on Ray from a spec: replicas, health checks, failover with resumed streams.

Colocated serving (no prefill pool): every decode replica prefills its own requests. A request
goes to the healthy replica with the fewest open requests. A monitor checks every replica's ranks;
when a rank dies the whole replica is torn down and rebuilt (a collective group cannot lose one
member). Its in-flight requests do not fail: each stream remembers the tokens every sample has
delivered, and when its replica fails each unfinished sample is resubmitted to a healthy replica
as prompt + those tokens with the remaining budget, so the client's stream continues with nothing
lost and nothing repeated (exactly so for greedy decoding; a seeded sample restarts its
generator from its seed).
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
    """One client request across replicas: what each of its samples has delivered so far."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    prompt: str | None
    timer: RequestTimer
    delivered: dict[int, list[int]] = field(default_factory=dict)  # sample index -> tokens sent
    finished: set[int] = field(default_factory=set)
    inner: dict[str, int] = field(default_factory=dict)  # engine request id -> replica index
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
            stream = self._streams.pop(request_id, None)
            inner = dict(stream.inner) if stream is not None else {}
        for inner_id, index in inner.items():
            replica = self.replicas[index]
            if replica is not None:
                replica.abort(inner_id)

    def _place(self, stream: _Stream, sample: int | None = None) -> None:
        """Submit the whole request (sample None), or resume one sample of it after a failure as
        its own request: prompt + the tokens that sample delivered, with the budget left."""
        if sample is None:
            inner_id, prompt_ids, params = stream.request_id, stream.prompt_ids, stream.params
        else:
            done = stream.delivered.get(sample, [])
            p = stream.params
            update = {"n": 1, "max_tokens": None if p.max_tokens is None else p.max_tokens - len(done),
                      "seed": None if p.seed is None else p.seed + sample}
            inner_id, prompt_ids, params = f"{stream.request_id}#{sample}.{stream.attempts}", stream.prompt_ids + done, p.model_copy(update=update)
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
                stream.inner[inner_id] = index
            try:
                replica.submit(inner_id, prompt_ids, params,
                               lambda item, i=inner_id, k=sample: self._on_item(stream, i, k, item), stream.prompt)
                return
            except EngineDead:
                continue  # it failed between the health look and the submit: try another

    def _on_item(self, stream: _Stream, inner_id: str, sample: int | None, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            with self._lock:
                stream.inner.pop(inner_id, None)
            if isinstance(item, ValueError) or self._stop.is_set():
                self._finish(stream)
                _notify(stream.sink, item)
                return
            pending = [sample] if sample is not None else [i for i in range(stream.params.n) if i not in stream.finished]
            stream.attempts += 1
            self.failovers += 1
            self.metrics.count("moecluster_failovers_total", 1, self.tags)
            log.warning("request %s: replica failed (%s); resuming samples %s", stream.request_id, item, pending)
            for index in pending:
                threading.Thread(target=self._place, args=(stream, index), daemon=True).start()
            return
        for o in item.outputs:
            if sample is not None:
                o.index = sample
            stream.delivered.setdefault(o.index, []).extend(o.token_ids)
            if o.finish_reason is not None:
                stream.finished.add(o.index)
        stream.timer.on_tokens(sum(len(o.token_ids) for o in item.outputs))
        item.request_id, item.prompt_token_ids = stream.request_id, stream.prompt_ids
        item.finished = len(stream.finished) == stream.params.n
        if item.finished:
            self._finish(stream)
            stream.timer.on_finish(next((o.finish_reason for o in item.outputs if o.finish_reason), "stop"))
        _notify(stream.sink, item)

    def _finish(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.pop(stream.request_id, None)

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
