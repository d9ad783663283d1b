"""`moecluster autoscale simulate`: replay a request trace through a modelled cluster, once under an
autoscaling policy and once with static provisioning sized for the peak, and compare SLO attainment
against GPU-hours.

The model (a discrete-event simulation; time is simulated, nothing runs on a GPU):

- A replica is one expert-parallel group of `ServiceModel.gpus_per_replica` GPUs. Its ranks each run
  an engine in lockstep (DP attention, EP MoE); the simulator treats the replica as one engine whose
  batch is the sum of the ranks' batches, as if the router balanced sequences over the ranks (the real
  step waits for the largest rank batch, so an unbalanced replica is slower than modelled).
- A replica steps like the engine: continuous batching, an FCFS queue, chunked prefill. A step
  carries one token for every decoding sequence plus prompt chunks up to `prefill_chunk_tokens` (the
  decode tokens count against that budget in a colocated replica) and takes
  `step_base_s + step_per_seq_s x decodes + step_per_prefill_token_s x prompt tokens`.
  A queued request is admitted (FCFS, no overtaking) while the replica runs fewer than
  `max_running_seqs` sequences and its KV cache can hold the request's final length: admission
  reserves prompt + output tokens, so nothing is ever preempted (the engine allocates block by block
  and preempts instead: the model admits slightly fewer sequences). Steps run back to back while
  there is work; an idle replica wakes on the next request.
- Colocated (one pool "decode", role "both"): a request goes to the serving replica with the fewest
  open requests, prefills there (its first token comes at the end of the step that finishes its
  prompt) and decodes there. Disaggregated (pools "prefill" and "decode"): it prefills on a prefill
  replica, whose first token is streamed when it hands over (as the deployment does), then its KV
  moves to the least-loaded decode replica in `handoff_s` (latency + bytes / bandwidth); the
  transfer and the wait for a decode slot delay the second token. The prefill replica keeps the
  prompt's KV until the transfer is done.
- TTFT = arrival to first token (queue + prefill). A request's ITL is the mean gap between its
  tokens; per-token ITL samples (for the p90 / p99 over all tokens, and the policy's signal) are the
  step times, plus the handoff gap for each request's first decoded token.
- The controller ticks every `interval_s` as the live `Autoscaler` does: per pool, p90 TTFT and
  p90 queue time (requests whose prompt started / first token came in the interval), p90 ITL over
  the interval's tokens, mean KV use over the serving replicas and the requests waiting now. It asks
  the policy with each pool's size (serving + starting replicas), clamps the answer to the pool's
  bounds (a pool without bounds keeps its size) and changes a pool at most once per `cooldown_s`.
  A new replica costs GPU time from the request and serves after `startup_s` (placement group,
  actors, weight loading). Scale-down first cancels replicas still starting, then drains the serving
  replica with the fewest open requests (never the last one, as the live pool): it takes no new
  requests, finishes what it has and is removed then. No request is ever dropped.
- Static baseline: the same trace with every pool fixed at the most replicas the policy had serving
  (or given counts), all serving from the start.
- GPU-hours = replica-seconds (from the scale-up request to removal, or the end of the run) x
  `gpus_per_replica` / 3600. SLO attainment = the fraction of requests whose TTFT <= `ttft_s` and
  whose mean ITL <= `itl_s` (`SLOTargets`).
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from moecluster.cluster.autoscale.policy import AutoscalePolicy, PoolMetrics, load_policy
from moecluster.cluster.autoscale.service_model import ServiceModel
from moecluster.cluster.autoscale.trace import TraceRequest
from moecluster.cluster.stats import percentile
from moecluster.cluster.spec import AutoscalingSpec, ScaleBounds, SLOTargets

Role = Literal["both", "prefill", "decode"]


@dataclass(frozen=True)
class PoolSetup:
    """One pool to simulate: its size at the start and its autoscaling bounds (None: fixed size)."""

    name: str  # "decode" | "prefill"
    role: Role
    replicas: int
    bounds: ScaleBounds | None = None


@dataclass(frozen=True)
class ScaleDecision:
    at_s: float
    pool: str
    before: int
    after: int


@dataclass(frozen=True)
class SimResult:
    """One run. Per request (trace order): TTFT, mean ITL (None: a single output token), finish time
    and how many times it completed. `itl_values` x `itl_weights`: every decoded token's gap.
    `timeline[pool]`: (time, serving, starting, draining) after each change."""

    label: str
    ttft_s: list[float]
    itl_mean_s: list[float | None]
    finish_s: list[float]
    completions: list[int]
    itl_values: list[float]
    itl_weights: list[int]
    timeline: dict[str, list[tuple[float, int, int, int]]]
    decisions: list[ScaleDecision]
    replica_s: dict[str, float]
    gpus_per_replica: int
    end_s: float

    @property
    def gpu_hours(self) -> float:
        return sum(self.replica_s.values()) * self.gpus_per_replica / 3600

    def peak_serving(self) -> dict[str, int]:
        return {pool: max(serving for _, serving, _, _ in line) for pool, line in self.timeline.items()}

    def attainment(self, targets: SLOTargets) -> dict[str, float]:
        n = len(self.ttft_s)
        ttft_ok = [t <= targets.ttft_s for t in self.ttft_s]
        itl_ok = [i is None or i <= targets.itl_s for i in self.itl_mean_s]
        return {
            "slo": sum(a and b for a, b in zip(ttft_ok, itl_ok)) / n,
            "ttft": sum(ttft_ok) / n,
            "itl": sum(itl_ok) / n,
        }

    def summary(self, targets: SLOTargets) -> dict[str, Any]:
        itl_means = [i for i in self.itl_mean_s if i is not None]
        return {
            "label": self.label,
            "requests": len(self.ttft_s),
            "completed": sum(1 for c in self.completions if c == 1),
            "attainment": self.attainment(targets),
            "ttft_s": {f"p{q}": percentile(self.ttft_s, q / 100) for q in (50, 90, 99)},
            "itl_token_s": {f"p{q}": _wpct(self.itl_values, self.itl_weights, q / 100) for q in (50, 90, 99)},
            "itl_request_mean_s": {f"p{q}": percentile(itl_means, q / 100) for q in (50, 90, 99)},
            "gpu_hours": self.gpu_hours,
            "replica_hours": {pool: s / 3600 for pool, s in self.replica_s.items()},
            "peak_serving": self.peak_serving(),
            "scale_events": len(self.decisions),
            "end_s": self.end_s,
        }


def _wpct(values: Sequence[float], weights: Sequence[int], q: float) -> float | None:
    """`percentile` over values repeated by their weights."""
    total = sum(weights)
    if not total:
        return None
    rank, seen = min(total - 1, int(q * total)), 0
    for value, weight in sorted(zip(values, weights)):
        seen += weight
        if seen > rank:
            return value
    raise AssertionError("unreachable: the weights sum to total")


# --- the simulation ---------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Req:
    index: int
    arrival_s: float
    prompt: int
    output: int
    enqueued_s: float = 0.0  # joined the queue it waits in now
    prefilled: int = 0
    first_token_s: float = math.nan
    finish_s: float = math.nan
    completions: int = 0


@dataclass(slots=True, eq=False)
class _Replica:
    pool: _Pool
    index: int
    requested_s: float
    state: str = "starting"  # starting | serving | draining | removed
    removed_s: float = math.nan
    queue: deque[_Req] = field(default_factory=deque)
    prefilling: list[_Req] = field(default_factory=list)  # admitted, prompt not done (FCFS)
    decoding: list[tuple[int, int, _Req]] = field(default_factory=list)  # heap of (last step, index, request)
    inbound: int = 0  # handoffs on their way here
    handing_off: int = 0  # prefilled requests whose KV is still being moved out
    kv_reserved: int = 0
    kv_prefilled: int = 0
    kv_held: int = 0  # prompt KV kept for handoffs in flight
    kv_decode_base: int = 0  # sum of (prompt + output - 1 - last step) over decoding: + steps x len gives their KV
    steps: int = 0
    busy: bool = False
    step_start: float = 0.0
    chunks: list[tuple[_Req, int]] = field(default_factory=list)
    admitted: list[_Req] = field(default_factory=list)
    decodes: int = 0

    def open_requests(self) -> int:
        return len(self.queue) + len(self.prefilling) + len(self.decoding) + self.inbound + self.handing_off

    def kv_used(self) -> int:
        return self.kv_prefilled + self.kv_held + self.kv_decode_base + self.steps * len(self.decoding)


@dataclass(eq=False)
class _Pool:
    name: str
    role: Role
    bounds: ScaleBounds | None
    replicas: list[_Replica] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)
    itl_values: list[float] = field(default_factory=list)
    itl_weights: list[int] = field(default_factory=list)
    touched: set[int] = field(default_factory=set)  # requests with a token or a finish this interval
    marks: tuple[int, int, int] = (0, 0, 0)  # where this interval's ttft, queue, itl samples start
    timeline: list[tuple[float, int, int, int]] = field(default_factory=list)
    last_change_s: float = -math.inf

    def live(self, state: str) -> list[_Replica]:
        return [r for r in self.replicas if r.state == state]

    def size(self) -> int:
        return sum(1 for r in self.replicas if r.state in ("serving", "starting"))


class _Sim:
    def __init__(self, requests: Sequence[TraceRequest], model: ServiceModel, pools: Sequence[PoolSetup],
                 policy: AutoscalePolicy | None, interval_s: float, cooldown_s: float) -> None:
        self.model, self.policy, self.interval_s, self.cooldown_s = model, policy, interval_s, cooldown_s
        self.reqs = [_Req(i, r.arrival_s, r.prompt_tokens, r.output_tokens) for i, r in enumerate(requests)]
        self.pools = {p.name: _Pool(p.name, p.role, p.bounds) for p in pools}
        self.entry = self.pools["prefill" if "prefill" in self.pools else "decode"]
        self.now, self.done, self.end_s = 0.0, 0, 0.0
        self.events: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self.seq = 0
        self.decisions: list[ScaleDecision] = []
        for p in pools:
            for _ in range(p.replicas):
                self._new_replica(self.pools[p.name]).state = "serving"
            self._mark(self.pools[p.name])

    def run(self) -> None:
        for req in self.reqs:
            self._at(req.arrival_s, self._arrive, req)
        if self.policy is not None:
            self._at(self.interval_s, self._tick, None)
        while self.done < len(self.reqs):
            if not self.events:
                raise RuntimeError(f"simulation stalled with {len(self.reqs) - self.done} requests open (a bug)")
            self.now, _, fn, arg = heapq.heappop(self.events)
            fn(arg)

    def _at(self, t: float, fn: Callable[[Any], None], arg: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn, arg))

    # requests and replicas

    def _arrive(self, req: _Req) -> None:
        self._enqueue(self._place(self.entry), req)

    def _place(self, pool: _Pool) -> _Replica:
        """The serving replica with the fewest open requests (ties: the lowest index)."""
        return min(pool.live("serving"), key=lambda r: (r.open_requests(), r.index))

    def _enqueue(self, rep: _Replica, req: _Req) -> None:
        req.enqueued_s = self.now
        rep.queue.append(req)
        if not rep.busy:
            self._start_step(rep)

    def _admit(self, rep: _Replica, req: _Req) -> bool:
        """Room for `req`: a sequence slot and KV for its final length (the prompt on a prefill replica)."""
        need = req.prompt if rep.pool.role == "prefill" else req.prompt + req.output
        if len(rep.prefilling) + len(rep.decoding) >= self.model.max_running_seqs:
            return False
        if rep.kv_reserved + need > self.model.kv_capacity_tokens:
            return False
        rep.kv_reserved += need
        return True

    def _start_step(self, rep: _Replica) -> None:
        role, now = rep.pool.role, self.now
        rep.chunks, rep.admitted = [], []
        prefill_tokens = 0
        if role == "decode":
            while rep.queue and self._admit(rep, rep.queue[0]):
                req = rep.queue.popleft()
                rep.admitted.append(req)
                last = rep.steps + req.output - 2
                rep.kv_decode_base += req.prompt + req.output - 1 - last
                heapq.heappush(rep.decoding, (last, req.index, req))
        elif rep.prefilling or rep.queue:
            budget = self.model.prefill_chunk_tokens - (len(rep.decoding) if role == "both" else 0)
            for req in rep.prefilling:
                if budget <= 0:
                    break
                take = min(req.prompt - req.prefilled, budget)
                rep.chunks.append((req, take))
                budget -= take
            while budget > 0 and rep.queue and self._admit(rep, rep.queue[0]):
                req = rep.queue.popleft()
                rep.pool.queue.append(now - req.enqueued_s)
                rep.prefilling.append(req)
                take = min(req.prompt, budget)
                rep.chunks.append((req, take))
                budget -= take
            prefill_tokens = self.model.prefill_chunk_tokens - (len(rep.decoding) if role == "both" else 0) - budget
        rep.decodes = len(rep.decoding)
        if not rep.decodes and not rep.chunks:
            rep.busy = False
            return
        rep.busy, rep.step_start = True, now
        self._at(now + self.model.step_s(rep.decodes, prefill_tokens), self._end_step, rep)

    def _end_step(self, rep: _Replica) -> None:
        pool, now, step = rep.pool, self.now, rep.steps
        if rep.decodes:
            old = rep.decodes - len(rep.admitted)
            if old:
                pool.itl_values.append(now - rep.step_start)
                pool.itl_weights.append(old)
            for req in rep.admitted:
                pool.itl_values.append(now - req.first_token_s)
                pool.itl_weights.append(1)
                pool.touched.add(req.index)
            while rep.decoding and rep.decoding[0][0] == step:
                last, _, req = heapq.heappop(rep.decoding)
                rep.kv_reserved -= req.prompt + req.output
                rep.kv_decode_base -= req.prompt + req.output - 1 - last
                self._finish(pool, req)
        if rep.chunks:
            for req, take in rep.chunks:
                req.prefilled += take
                rep.kv_prefilled += take
                if req.prefilled == req.prompt:
                    rep.kv_prefilled -= req.prompt
                    self._prefilled(rep, req, step)
            rep.prefilling = [r for r in rep.prefilling if r.prefilled < r.prompt]
        rep.steps = step + 1
        self._start_step(rep)
        self._maybe_remove(rep)

    def _prefilled(self, rep: _Replica, req: _Req, step: int) -> None:
        """The prompt is done: first token now; then decode here, hand over, or finish (one token)."""
        pool = rep.pool
        req.first_token_s = self.now
        pool.ttft.append(self.now - req.arrival_s)
        pool.touched.add(req.index)
        if req.output == 1:
            rep.kv_reserved -= req.prompt if pool.role == "prefill" else req.prompt + 1
            self._finish(pool, req)
        elif pool.role == "both":
            last = step + req.output - 1
            rep.kv_decode_base += req.prompt + req.output - 1 - last
            heapq.heappush(rep.decoding, (last, req.index, req))
        else:
            dest = self._place(self.pools["decode"])
            dest.inbound += 1
            rep.handing_off += 1
            rep.kv_held += req.prompt
            self._at(self.now + self.model.handoff_s(req.prompt), self._handed_off, (rep, dest, req))

    def _handed_off(self, arg: tuple[_Replica, _Replica, _Req]) -> None:
        src, dest, req = arg
        src.handing_off -= 1
        src.kv_held -= req.prompt
        src.kv_reserved -= req.prompt
        dest.inbound -= 1
        self._enqueue(dest, req)
        if not src.busy:
            self._start_step(src)
        self._maybe_remove(src)

    def _finish(self, pool: _Pool, req: _Req) -> None:
        req.finish_s = self.now
        req.completions += 1
        pool.touched.add(req.index)
        self.done += 1
        self.end_s = self.now

    # replicas coming and going

    def _new_replica(self, pool: _Pool) -> _Replica:
        rep = _Replica(pool, len(pool.replicas), self.now)
        pool.replicas.append(rep)
        return rep

    def _ready(self, rep: _Replica) -> None:
        if rep.state == "starting":  # not cancelled meanwhile
            rep.state = "serving"
            self._mark(rep.pool)

    def _maybe_remove(self, rep: _Replica) -> None:
        if rep.state == "draining" and not rep.busy and rep.open_requests() == 0:
            rep.state, rep.removed_s = "removed", self.now
            self._mark(rep.pool)

    def _mark(self, pool: _Pool) -> None:
        entry = (self.now, len(pool.live("serving")), len(pool.live("starting")), len(pool.live("draining")))
        if pool.timeline and pool.timeline[-1][0] == self.now:
            pool.timeline[-1] = entry
        else:
            pool.timeline.append(entry)

    # the controller

    def _tick(self, _: Any) -> None:
        assert self.policy is not None
        metrics = {name: self._metrics(pool) for name, pool in self.pools.items()}
        sizes = {name: pool.size() for name, pool in self.pools.items()}
        wanted = self.policy.decide(metrics, sizes)
        for name, pool in self.pools.items():
            if pool.bounds is None or name not in wanted:
                continue
            want = max(pool.bounds.min_replicas, min(pool.bounds.max_replicas, int(wanted[name])))
            if want != sizes[name] and self.now - pool.last_change_s >= self.cooldown_s:
                self._resize(pool, sizes[name], want)
        if self.done < len(self.reqs):
            self._at(self.now + self.interval_s, self._tick, None)

    def _metrics(self, pool: _Pool) -> PoolMetrics:
        t, q, i = pool.marks
        serving = pool.live("serving")
        for rep in pool.replicas:
            pool.touched.update(index for _, index, _ in rep.decoding)
        metrics = PoolMetrics(
            pool=pool.name, role=pool.role, replicas=len(serving), requests=len(pool.touched),
            ttft_p90=percentile(pool.ttft[t:], 0.9), queue_p90=percentile(pool.queue[q:], 0.9),
            itl_p90=_wpct(pool.itl_values[i:], pool.itl_weights[i:], 0.9),
            kv_usage=sum(r.kv_used() for r in serving) / (len(serving) * self.model.kv_capacity_tokens) if serving else 0.0,
            waiting=sum(len(r.queue) for r in pool.replicas),
        )
        pool.marks = (len(pool.ttft), len(pool.queue), len(pool.itl_values))
        pool.touched = set()
        return metrics

    def _resize(self, pool: _Pool, before: int, after: int) -> None:
        for _ in range(after - before):
            self._at(self.now + self.model.startup_s, self._ready, self._new_replica(pool))
        excess = before - after
        for rep in reversed(pool.live("starting")[-excess:] if excess > 0 else []):
            rep.state, rep.removed_s = "removed", self.now
            excess -= 1
        while excess > 0 and len(serving := pool.live("serving")) > 1:
            rep = min(serving, key=lambda r: (r.open_requests(), -r.index))
            rep.state = "draining"
            self._maybe_remove(rep)
            excess -= 1
        if pool.size() != before:  # else: only the last serving replica was left to drain
            pool.last_change_s = self.now
            self._mark(pool)
            self.decisions.append(ScaleDecision(self.now, pool.name, before, pool.size()))

    def result(self, label: str) -> SimResult:
        replica_s: dict[str, float] = {}
        for pool in self.pools.values():
            self._mark(pool)
            end = [self.end_s if math.isnan(r.removed_s) else r.removed_s for r in pool.replicas]
            replica_s[pool.name] = sum(e - r.requested_s for e, r in zip(end, pool.replicas))
        return SimResult(
            label=label,
            ttft_s=[r.first_token_s - r.arrival_s for r in self.reqs],
            itl_mean_s=[(r.finish_s - r.first_token_s) / (r.output - 1) if r.output > 1 else None for r in self.reqs],
            finish_s=[r.finish_s for r in self.reqs],
            completions=[r.completions for r in self.reqs],
            itl_values=[v for p in self.pools.values() for v in p.itl_values],
            itl_weights=[w for p in self.pools.values() for w in p.itl_weights],
            timeline={name: list(p.timeline) for name, p in self.pools.items()},
            decisions=list(self.decisions),
            replica_s=replica_s,
            gpus_per_replica=self.model.gpus_per_replica,
            end_s=self.end_s,
        )


def simulate(
    requests: Sequence[TraceRequest],
    model: ServiceModel,
    pools: Sequence[PoolSetup],
    policy: AutoscalePolicy | None = None,
    interval_s: float = 10.0,
    cooldown_s: float = 60.0,
    label: str = "policy",
) -> SimResult:
    """Run the trace to its last completion. Without a policy every pool keeps its size."""
    expected = {"decode": "both"} if len(pools) == 1 else {"prefill": "prefill", "decode": "decode"}
    if {p.name: p.role for p in pools} != expected:
        raise ValueError("pools: colocated is one pool 'decode' of role 'both', disaggregated 'prefill' and 'decode' "
                         f"of their own roles; got {[(p.name, p.role) for p in pools]}")
    for p in pools:
        if p.replicas < 1:
            raise ValueError(f"pools: {p.name} starts with {p.replicas} replicas; it needs at least 1")
    _check_fits(requests, model)
    if policy is not None:
        _check_span(requests, interval_s)
    sim = _Sim(requests, model, pools, policy, interval_s, cooldown_s)
    sim.run()
    return sim.result(label)


def _check_fits(requests: Sequence[TraceRequest], model: ServiceModel) -> None:
    for i, r in enumerate(requests):
        if r.prompt_tokens + r.output_tokens > model.kv_capacity_tokens:
            raise ValueError(f"request {i}: prompt + output = {r.prompt_tokens + r.output_tokens} tokens exceed a "
                             f"replica's KV capacity ({model.kv_capacity_tokens})")


# The controller ticks every interval from t = 0 to the last request: past this many ticks the
# trace's times are almost surely absolute (Unix time, milliseconds), and the run would take hours.
MAX_TICKS = 2_000_000


def _check_span(requests: Sequence[TraceRequest], interval_s: float) -> None:
    if not requests:
        return
    last = max(r.arrival_s for r in requests)
    if last / interval_s > MAX_TICKS:
        first = min(r.arrival_s for r in requests)
        raise ValueError(
            f"trace: the last request arrives at {last:g} s, {last / interval_s:.3g} controller intervals of "
            f"{interval_s:g} s (at most {MAX_TICKS:,}); arrival_s is seconds from the start of the trace, so "
            f"absolute times (the first request is at {first:g} s) must have the first arrival subtracted")


def static_pools(pools: Sequence[PoolSetup], counts: Mapping[str, int]) -> list[PoolSetup]:
    """The same pools at fixed sizes (at least one replica each)."""
    unknown = sorted(set(counts) - {p.name for p in pools})
    if unknown:
        raise ValueError(f"static replicas: no pool named {', '.join(map(repr, unknown))} in this deployment "
                         f"(its pools: {', '.join(p.name for p in pools)})")
    return [replace(p, replicas=max(1, counts.get(p.name, p.replicas)), bounds=None) for p in pools]


@dataclass(frozen=True)
class Comparison:
    policy: SimResult
    static: SimResult
    static_replicas: dict[str, int]


def compare(
    requests: Sequence[TraceRequest],
    model: ServiceModel,
    pools: Sequence[PoolSetup],
    autoscaling: AutoscalingSpec,
    static_replicas: Mapping[str, int] | None = None,
) -> Comparison:
    """The policy of `autoscaling` against static provisioning at its peak (or `static_replicas`)."""
    policy = load_policy(autoscaling)
    static_pools(pools, static_replicas or {})  # a pool name that is not there fails before the runs
    run = simulate(requests, model, pools, policy, autoscaling.interval_s, autoscaling.cooldown_s, "policy")
    counts = dict(run.peak_serving()) | dict(static_replicas or {})
    fixed = static_pools(pools, counts)
    static = simulate(requests, model, fixed, label="static")
    return Comparison(run, static, {p.name: p.replicas for p in fixed})
