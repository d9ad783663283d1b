"""A deployment on Ray from a spec: pools of replicas, KV handoffs, health checks, failover.

Colocated (no `prefill` pool): a request goes to the decode replica with the fewest open
requests, which prefills and decodes it. Disaggregated: it goes to a prefill replica; each sample
the prefill rank hands over (first token streamed, latent blocks in Ray's object store) is routed
here to a decode replica as its own inner request `"{inner}@{sample}"`; when the decode rank has
the blocks ("taken") the prefill rank is told to free its copy. Replicas know a request by an
inner id unique in the deployment (`"{request_id}#{serial}"`), so a client may reuse an id as soon
as it aborted it: the old inner request's last outputs, still on their way, reach no new stream.

A monitor checks every replica's ranks; when a rank dies the whole replica is torn down and
rebuilt (a collective group cannot lose one member). Its in-flight requests do not fail: each
stream remembers the tokens every sample has delivered, and when the replica serving a sample
fails, the sample is resubmitted to a healthy replica of the entry pool as prompt + those tokens
with the remaining budget, so the client's stream continues with nothing lost and nothing
repeated (exactly so for greedy decoding; a seeded sample restarts its generator from its seed).
A handoff whose prefill replica died before the decode side read it is prefilled again there.
The resumed sample's text is made on the driver (`resumed_text.py`): the new replica's detokenizer
starts empty, and the old one may have held back part of a character or of a stop string.
A sample resumed `max_resumes` times without finishing fails with the last error, so a request that
kills every replica it reaches (a poison request) cannot keep taking the pool down.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from moecluster.cluster.autoscale.window import LatencyWindow
from moecluster.cluster.metrics import RayMetrics, RequestTimer
from moecluster.cluster.pool import Pool
from moecluster.cluster.replica import Replica
from moecluster.cluster.request_log import log_event
from moecluster.cluster.resumed_text import ResumedText
from moecluster.cluster.spec import DeploymentSpec, PoolSpec
from moecluster.router.requests.placement import RankView
from moecluster.text.tokenizer import load_tokenizer
from moecluster.workers.engine.async_engine import EngineDead, Sink, _notify
from moecluster.workers.engine.engine_config import EngineConfig
from moecluster.workers.engine.outputs import CompletionOutput, RequestOutput
from moecluster.workers.engine.request_limits import RequestLimits
from moecluster.workers.engine.sampler import GREEDY_BELOW  # temperatures below it are greedy
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.transfer.handoff import KVHandoff

log = logging.getLogger(__name__)

# A seed seeds one torch generator per sample (seed + sample index): torch takes 64 bits, the API
# (generation.proto) an int64. Outside that range the engine step itself would fail.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def engine_config(spec: DeploymentSpec, pool: PoolSpec) -> EngineConfig:
    e, c = spec.engine, spec.cache
    return EngineConfig(
        model=spec.model, dtype=e.dtype, load_format=e.load_format, device=pool.device, trust_remote_code=spec.trust_remote_code,
        block_size=c.block_size, num_kv_blocks=c.num_blocks, kv_cache_memory_bytes=c.memory_bytes,
        gpu_memory_utilization=c.memory_fraction, max_model_len=e.max_model_len, max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens, enable_chunked_prefill=e.enable_chunked_prefill,
        enable_prefix_caching=c.enable_prefix_caching, eplb_redundant_slots=e.eplb_redundant_slots,
        eplb_interval_steps=e.eplb_interval_steps, cuda_graph_max_batch=e.cuda_graph_max_batch,
        async_scheduling=e.async_scheduling, decode_experts_w8a8=e.decode_experts_w8a8,
        decode_linears_w8a8=e.decode_linears_w8a8,
        kv_transfer=("p2p" if pool.device == "cuda" else "object_store") if e.kv_transfer == "auto" else e.kv_transfer,
    )


def _rank_views(replica: Replica, health: list[dict[str, Any]]) -> list[RankView]:
    return [
        RankView(replica.name, h["rank"], healthy=bool(h["alive"]), open_requests=0,
                 waiting=h["stats"].num_waiting if h.get("stats") else 0,
                 kv_usage=h["stats"].kv_usage if h.get("stats") else 0.0,
                 cached=frozenset(h.get("cached", ())))
        for h in health
    ]


@dataclass
class _Route:
    """One live inner request: where it runs and which client sample it serves (None: all)."""

    pool: str
    replica: Replica | None  # None while a handoff waits for a decode replica
    sample: int | None


@dataclass(frozen=True)
class _Held:
    """A handoff the decode side has not taken yet: the prefill rank keeps its blocks."""

    replica: Replica
    rank: int
    request_id: str  # the prefill side's request id and sample index
    sample_index: int


@dataclass
class _Stream:
    """One client request across replicas: what each of its samples has delivered so far."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    prompt: str | None
    timer: RequestTimer
    # The replicas know it as "{request_id}#{serial}" (serial unique in this deployment): a client
    # may reuse an id as soon as it was aborted, while the old inner request's last outputs are
    # still on their way from a rank; they must not reach the new stream.
    inner: str
    delivered: dict[int, list[int]] = field(default_factory=dict)  # sample index -> tokens sent
    sent_chars: dict[int, int] = field(default_factory=dict)  # sample index -> characters of text sent
    resumed: dict[int, ResumedText] = field(default_factory=dict)  # samples that failed over: their text
    resumes: dict[int, int] = field(default_factory=dict)  # sample index -> times it failed over
    finished: set[int] = field(default_factory=set)
    routes: dict[str, _Route] = field(default_factory=dict)  # inner request id -> where it runs
    inner_ids: set[str] = field(default_factory=set)  # every inner id it ever had
    attempts: int = 0
    closed: bool = False  # finished, failed or aborted: nothing more reaches the sink
    lock: threading.RLock = field(default_factory=threading.RLock)  # one poller thread at a time per stream


class Deployment:
    def __init__(self, spec: DeploymentSpec, health_interval_s: float = 1.0, max_resumes: int = 3) -> None:
        self.spec = spec
        self.max_resumes = max_resumes
        self._decoder: Any = None  # the tokenizer, loaded at the first failover (`_load_decoder`)
        self._decoder_lock = threading.Lock()
        self.pools: dict[str, Pool] = {}
        split = spec.prefill is not None
        if split:
            assert spec.prefill is not None
            self.pools["prefill"] = Pool("prefill", spec.prefill, engine_config(spec, spec.prefill), "prefill", self._on_event)
        self.pools["decode"] = Pool("decode", spec.decode, engine_config(spec, spec.decode),
                                    "decode" if split else "both", self._on_event)
        self.entry = self.pools["prefill" if split else "decode"]
        self._lock = threading.Lock()
        self._serial = itertools.count()  # inner request ids (`_Stream.inner`)
        self._streams: dict[str, _Stream] = {}
        self._owner: dict[str, tuple[_Stream, int | None]] = {}  # inner id -> (stream, client sample)
        self._held: dict[str, _Held] = {}  # decode inner id -> the prefill rank holding its blocks
        self._stop = threading.Event()
        self._views: dict[str, list[RankView]] = {}  # entry-pool replica -> its ranks, as last checked
        self.window = LatencyWindow()
        self.failovers = 0
        self._transfers: dict[str, int] = {}  # taken handoffs by outcome ("received", "refilled")
        self.on_rebuilt: Callable[[str], None] | None = None  # told the name of each rebuilt replica (empty cache)
        self.metrics = RayMetrics()
        self.tags = {"model": spec.served_name or spec.model.name}
        try:
            for pool in self.pools.values():
                pool.start()
        except BaseException:
            for pool in self.pools.values():
                pool.shutdown()
            raise
        self.limits: list[RequestLimits] = [
            next(r for r in pool.replicas if r is not None).limits for pool in self.pools.values()
        ]
        for _, replica in self.entry.healthy():
            self._views[replica.name] = _rank_views(replica, replica.health())
        self._monitor = threading.Thread(target=self._watch, args=(health_interval_s,), name="moecluster-health", daemon=True)
        self._monitor.start()

    # ---- requests ------------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Validate against every pool the request passes through; its length budget."""
        if params.seed is not None and not SEED_MIN <= params.seed <= SEED_MAX:
            raise ValueError(f"seed: must be a 64-bit signed integer ({SEED_MIN} to {SEED_MAX}), got {params.seed}")
        return min(limits.check(prompt_ids, params) for limits in self.limits)

    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink, prompt: str | None = None,
        target: tuple[str, int] | None = None,
    ) -> None:
        """Queue a request; `target` (replica name, rank) of the entry pool is where the router wants
        it (used while that replica is healthy; otherwise the least-loaded one)."""
        self.check(prompt_ids, params)
        if 0.0 < params.temperature < GREEDY_BELOW:
            params = params.model_copy(update={"temperature": 0.0})
        if "#" in request_id or "@" in request_id:
            raise ValueError(f"request id {request_id!r} must not contain '#' or '@' (they mark internal sample ids)")
        timer = RequestTimer(self.metrics, self.tags, observer=self._observe)
        inner = f"{request_id}#{next(self._serial)}"
        stream = _Stream(request_id, list(prompt_ids), params, sink, prompt, timer, inner)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
        log_event(request_id, "accepted", prompt_tokens=len(prompt_ids), n=params.n, max_tokens=params.max_tokens)
        if self.entry.least_loaded() is None:  # every replica is being rebuilt: wait off the caller's thread
            threading.Thread(target=self._place, args=(stream, None, target), daemon=True).start()
        else:
            self._place(stream, target=target)

    def abort(self, request_id: str) -> bool:
        """Stop a request everywhere it runs, free its blocks, and end its stream with "abort"
        (False: no such request is running)."""
        with self._lock:
            stream = self._streams.get(request_id)
            routes = dict(stream.routes) if stream is not None else {}
        if stream is None:
            return False
        for inner_id, route in routes.items():
            if route.replica is not None:
                route.replica.abort(inner_id)
        left = [CompletionOutput(i, "", [], finish_reason="abort") for i in range(stream.params.n) if i not in stream.finished]
        if self._close(stream, RequestOutput(request_id, stream.prompt, stream.prompt_ids, left, finished=True)):
            stream.timer.on_finish("abort")
            log_event(request_id, "aborted", delivered=sum(map(len, stream.delivered.values())))
        return True

    def _observe(self, signal: str, seconds: float) -> None:
        """Client-side latencies for the autoscaler: TTFT belongs to the pool that prefills, ITL to
        the pool that decodes (the same pool when colocated)."""
        self.window.record(signal, self.entry.name if signal == "ttft" else "decode", seconds)

    def num_open(self) -> int:
        return len(self._streams)

    def _place(self, stream: _Stream, sample: int | None = None, target: tuple[str, int] | None = None) -> None:
        """Submit the whole request (sample None) to the entry pool, or resume one sample of it after
        a failure as its own request: prompt + the tokens that sample delivered, with the budget left."""
        if sample is None:
            inner_id, prompt_ids, params = stream.inner, stream.prompt_ids, stream.params
        else:
            done = stream.delivered.get(sample, [])
            p = stream.params
            update = {"n": 1, "max_tokens": None if p.max_tokens is None else p.max_tokens - len(done),
                      "seed": None if p.seed is None else p.seed + sample}
            inner_id, prompt_ids, params = f"{stream.inner}.{sample}.{stream.attempts}", stream.prompt_ids + done, p.model_copy(update=update)
            decoder = self._load_decoder()  # before the stream's lock: its poller threads wait on that
            if decoder is not None:
                with stream.lock:
                    stream.resumed[sample] = ResumedText(decoder, p, done, stream.sent_chars.get(sample, 0))
        while not stream.closed:
            pick = self.entry.named(target[0]) if target is not None else None
            rank = target[1] if pick is not None and target is not None else None
            target = None  # only the first try
            pick = pick or self.entry.least_loaded()
            if pick is None:
                if self._stop.is_set():
                    self._close(stream, EngineDead("the deployment is shut down"))
                    return
                time.sleep(0.2)  # every replica of the pool is being rebuilt: wait, the request is kept
                continue
            _, replica = pick
            with self._lock:
                stream.routes[inner_id] = _Route(self.entry.name, replica, sample)
                stream.inner_ids.add(inner_id)
                self._owner[inner_id] = (stream, sample)
            try:
                replica.submit(inner_id, prompt_ids, params, lambda item: self._on_item(stream, inner_id, item),
                               stream.prompt, rank)
            except EngineDead:
                with self._lock:
                    stream.routes.pop(inner_id, None)
                continue  # it failed between the health look and the submit: try another
            except ValueError as e:  # refused by the replica (e.g. an id still draining there)
                with self._lock:
                    stream.routes.pop(inner_id, None)
                if self._close(stream, e):
                    log_event(stream.request_id, "failed", error=str(e))
                return
            if stream.closed:  # aborted while being placed
                replica.abort(inner_id)
                return
            log_event(stream.request_id, "placed", pool=self.entry.name, replica=replica.name, inner_id=inner_id,
                      sample=sample, prompt_tokens=len(prompt_ids))
            return

    # ---- prefill -> decode handoffs ---------------------------------------------------------------
    def _on_event(self, replica: Replica, kind: str, rank: int, payload: Any) -> None:
        if kind == "handoff":
            self._on_handoff(replica, rank, payload)
        elif kind == "taken":
            inner_id, outcome = payload
            self._release(inner_id)
            self.metrics.count("moecluster_kv_transfers_total", 1, {**self.tags, "outcome": outcome})
            with self._lock:
                self._transfers[outcome] = self._transfers.get(outcome, 0) + 1
                owner = self._owner.get(inner_id)
            if owner is not None:
                log_event(owner[0].request_id, "kv_taken", inner_id=inner_id, replica=replica.name, rank=rank,
                          outcome=outcome)

    def transfer_outcomes(self) -> dict[str, int]:
        """Handoffs the decode pool took so far, by outcome ("received", or "refilled" from the prompt)."""
        with self._lock:
            return dict(self._transfers)

    def _on_handoff(self, prefill: Replica, rank: int, h: KVHandoff) -> None:
        decode_id = f"{h.request_id}@{h.sample_index}"
        with self._lock:
            owner = self._owner.get(h.request_id)
            ended = owner is not None and (h.sample_index if owner[1] is None else owner[1]) in owner[0].finished
            if owner is None or owner[0].closed or ended:
                owner = None  # aborted, or a sample the driver already ended
            else:
                stream, sample = owner
                client = sample if sample is not None else h.sample_index
                self._held[decode_id] = _Held(prefill, rank, h.request_id, h.sample_index)
                self._owner[decode_id] = (stream, client)
                stream.inner_ids.add(decode_id)
                stream.routes[decode_id] = _Route("decode", None, client)  # live from now on
        if owner is None:  # aborted meanwhile: nobody will take it
            prefill.ack(rank, h.request_id, h.sample_index)
            return
        log_event(stream.request_id, "handoff", inner_id=decode_id, sample=client, prefill=prefill.name, rank=rank,
                  blocks=h.ticket.num_blocks)
        try:
            self._place_prefilled(stream, decode_id, h, wait=False)
        except Exception as e:  # noqa: BLE001 - the first token went out: the sample must not be left without a route
            log.exception("request %s: placing handoff %s failed", stream.request_id, decode_id)
            with self._lock:
                route = stream.routes.get(decode_id)
            if route is not None and route.replica is not None:
                route.replica.streams.forget(decode_id)
            # as a failure of the decode route: the sample resumes from the prompt and what it delivered
            self._on_item(stream, decode_id, RuntimeError(f"placing handoff {decode_id} failed: {e!r}"))

    def _place_prefilled(self, stream: _Stream, decode_id: str, h: KVHandoff, wait: bool = True) -> None:
        """Continue a handoff on the least-loaded decode replica. wait=False (the prefill replica's
        poller, inside its event): one try, and when no decode replica can take it now the waiting
        moves to a thread of its own, since the poller must never block."""
        pool = self.pools["decode"]
        while not stream.closed:
            pick = pool.least_loaded()
            if pick is None:
                if self._stop.is_set():
                    self._close(stream, EngineDead("the deployment is shut down"))
                    return
                if not wait:  # every decode replica is being rebuilt
                    break
                time.sleep(0.2)
                continue
            _, replica = pick
            with self._lock:
                route = stream.routes.get(decode_id)
                if route is None:
                    return
                route.replica = replica
            try:
                replica.submit_prefilled(decode_id, h, lambda item: self._on_item(stream, decode_id, item))
            except EngineDead:
                if not wait:  # it failed between the health look and the submit
                    break
                continue
            except ValueError as e:
                self._release(decode_id)
                if self._close(stream, e):
                    log_event(stream.request_id, "failed", error=str(e))
                return
            if stream.closed:
                replica.abort(decode_id)
                return
            log_event(stream.request_id, "placed", pool="decode", replica=replica.name, inner_id=decode_id,
                      sample=route.sample)
            return
        if not wait and not stream.closed:  # it left the loop to wait: on a thread of its own
            threading.Thread(target=self._place_prefilled, args=(stream, decode_id, h), daemon=True).start()

    def _release(self, inner_id: str) -> None:
        """The decode side took (or will never take) this handoff: the prefill rank frees its blocks."""
        with self._lock:
            held = self._held.pop(inner_id, None)
        if held is not None:
            held.replica.ack(held.rank, held.request_id, held.sample_index)

    # ---- deltas and failures -------------------------------------------------------------------
    def _on_item(self, stream: _Stream, inner_id: str, item: RequestOutput | BaseException) -> None:
        with stream.lock:  # samples on different ranks arrive on different poller threads
            self._on_item_locked(stream, inner_id, item)

    def _on_item_locked(self, stream: _Stream, inner_id: str, item: RequestOutput | BaseException) -> None:
        if stream.closed:
            return
        if isinstance(item, BaseException):
            self._on_failure(stream, inner_id, item)
            return
        with self._lock:
            route = stream.routes.get(inner_id)
            if route is None:
                return  # from an inner request that already failed over: its samples run elsewhere
            if item.finished:
                stream.routes.pop(inner_id, None)
        outputs, stopped = [], False
        for o in item.outputs:
            if route is not None and route.sample is not None:
                o.index = route.sample
            if o.index in stream.finished:
                continue  # a sample the driver already ended (a stop string across a resume point)
            text = stream.resumed.get(o.index)
            if text is not None:
                piece = text.feed(o.token_ids, o.finish_reason, o.stop_reason)
                if piece.kept < len(o.token_ids):
                    o.token_ids = o.token_ids[: piece.kept]
                    o.logprobs = None if o.logprobs is None else o.logprobs[: piece.kept]
                if piece.finish_reason is not None and o.finish_reason is None:
                    stopped = True  # ended here, not by its engine: that inner request must stop
                o.text, o.finish_reason, o.stop_reason = piece.text, piece.finish_reason, piece.stop_reason
            stream.delivered.setdefault(o.index, []).extend(o.token_ids)
            stream.sent_chars[o.index] = stream.sent_chars.get(o.index, 0) + len(o.text)
            if o.finish_reason is not None:
                stream.finished.add(o.index)
            outputs.append(o)
        item.outputs = outputs
        if stopped and not item.finished:
            self._end_route(stream, inner_id)
        stream.timer.on_tokens(sum(len(o.token_ids) for o in item.outputs))
        item.request_id, item.prompt, item.prompt_token_ids = stream.request_id, stream.prompt, stream.prompt_ids
        item.finished = len(stream.finished) == stream.params.n
        if item.finished:
            reason = next((o.finish_reason for o in item.outputs if o.finish_reason), "stop")
            if not self._close(stream, item):
                return
            stream.timer.on_finish(reason)
            log_event(stream.request_id, "finished", finish_reason=reason, attempts=stream.attempts,
                      output_tokens=sum(map(len, stream.delivered.values())),
                      e2e_s=round(time.perf_counter() - stream.timer.start, 6))
            return
        _notify(stream.sink, item)

    def _on_failure(self, stream: _Stream, inner_id: str, error: BaseException) -> None:
        self._release(inner_id)
        with self._lock:
            route = stream.routes.pop(inner_id, None)
            live = {r.sample for r in stream.routes.values()}
        if route is None:
            return  # not live (already failed over or finished)
        if isinstance(error, ValueError) or self._stop.is_set():  # refused, or shutting down: tell the client
            if self._close(stream, error):
                log_event(stream.request_id, "failed", error=str(error))
            return
        samples = range(stream.params.n) if route.sample is None else [route.sample]
        pending = [s for s in samples if s not in stream.finished and s not in live and None not in live]
        if not pending:
            return
        for s in pending:
            stream.resumes[s] = stream.resumes.get(s, 0) + 1
        worn = [s for s in pending if stream.resumes[s] > self.max_resumes]
        if worn:  # it fails wherever it runs (or the pool keeps dying): stop, with the reason
            failed = RuntimeError(f"sample {worn[0]} of request {stream.request_id} failed on {self.max_resumes + 1} "
                                  f"replicas in turn; the last error: {error}")
            if self._close(stream, failed):
                log_event(stream.request_id, "failed", error=str(failed))
            return
        stream.attempts += 1
        self.failovers += 1
        self.metrics.count("moecluster_failovers_total", 1, self.tags)
        log.warning("request %s: %s failed (%s); resuming samples %s", stream.request_id, inner_id, error, pending)
        log_event(stream.request_id, "failover", inner_id=inner_id, error=str(error), samples=pending,
                  attempt=stream.attempts)
        for sample in pending:
            threading.Thread(target=self._place, args=(stream, sample), daemon=True).start()

    def _load_decoder(self) -> Any:
        """The model's tokenizer, for the text of resumed samples (loaded at the first failover; None
        if it would not load: the new replica's own text is used then)."""
        with self._decoder_lock:
            if self._decoder is None:
                try:
                    self._decoder = load_tokenizer(self.spec.model, trust_remote_code=self.spec.trust_remote_code)
                except Exception as e:  # noqa: BLE001 - a failover must go on without it
                    log.warning("loading the tokenizer for resumed samples failed: %r", e)
            return self._decoder

    def _end_route(self, stream: _Stream, inner_id: str) -> None:
        """Stop one inner request of a stream that goes on (its sample was ended by the driver)."""
        with self._lock:
            route = stream.routes.pop(inner_id, None)
        if route is not None and route.replica is not None:
            route.replica.abort(inner_id)
            route.replica.streams.forget(inner_id)
        self._release(inner_id)

    def _close(self, stream: _Stream, last: RequestOutput | BaseException | None) -> bool:
        """End a stream once (its last item to the sink); False if it had already ended."""
        with self._lock:
            if stream.closed:
                return False
            stream.closed = True
            self._streams.pop(stream.request_id, None)
            for inner_id in stream.inner_ids:
                self._owner.pop(inner_id, None)
            live = [(inner_id, r.replica) for inner_id, r in stream.routes.items() if r.replica is not None]
            stream.routes.clear()
        for inner_id, replica in live:  # samples still running elsewhere stop and free their blocks
            replica.abort(inner_id)
            replica.streams.forget(inner_id)
        for inner_id in stream.inner_ids:
            self._release(inner_id)
        if last is not None:
            _notify(stream.sink, last)
        return True

    # ---- health and failover -------------------------------------------------------------------
    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for pool in self.pools.values():
                for i, replica in enumerate(pool.replicas):
                    if self._stop.is_set():
                        return
                    if i in pool.retired:
                        continue
                    if replica is not None:
                        health = replica.health(timeout=interval * 5)
                        if replica.healthy and all(h["alive"] for h in health):
                            self._views[replica.name] = _rank_views(replica, health)
                            continue
                        self._views.pop(replica.name, None)
                        log.warning("replica %s is unhealthy: rebuilding it", replica.name)
                        pool.replicas[i] = None
                        replica.streams.fail("a rank is dead")  # its streams resume elsewhere
                        replica.shutdown(timeout=5.0)
                    try:
                        pool.replicas[i] = pool.build(i)
                        log.warning("replica %s-%d is back", pool.name, i)
                        if self.on_rebuilt is not None:
                            self.on_rebuilt(f"{pool.name}-{i}")
                    except Exception as e:  # noqa: BLE001 - keep serving on the others, retry next round
                        log.error("rebuilding replica %s-%d failed: %r", pool.name, i, e)

    def rank_views(self) -> list[RankView]:
        """The entry pool's DP ranks for the router's placement: health and cache contents as of
        the last check, open requests as of now."""
        views = []
        for _, replica in self.entry.healthy():
            load = replica.streams.load()
            views += [replace(v, open_requests=load[v.rank]) for v in self._views.get(replica.name, ())]
        return views

    def status(self) -> list[dict[str, Any]]:
        return [s for pool in self.pools.values() for s in pool.status()]

    def step_profiles(self, clear: bool = False) -> dict[str, list[dict[str, Any]]]:
        """Per replica, each rank's per-phase step times over its recent steps."""
        return {name: profile for pool in self.pools.values() for name, profile in pool.step_profiles(clear).items()}

    def shutdown(self) -> None:
        self._stop.set()
        self._monitor.join(10)
        for pool in self.pools.values():
            pool.shutdown()
