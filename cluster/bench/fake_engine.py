"""A fast fake engine behind the router's `Backend` interface, to measure the router alone.

It validates sampling exactly as the deployment does (`SamplingParams`), then one stepping thread
emits one token per open sample every `step_s` (like an engine's decode step over the whole
batch), so the router sees the same delta traffic a deployment sends, without a model. Token ids
are a deterministic function of the prompt and position; each delta's emission time is recorded
so the benchmark can measure what the router adds between the engine and the client.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from moecluster.cluster.serving_backend import sampling_params
from moecluster.router.requests.backend import ChoiceDelta, Delta, ModelInfo, ReplicaState, Sink
from moecluster.router.requests.placement import RankView, Target


@dataclass
class _Open:
    request_id: str
    seed: int
    n: int
    max_tokens: int
    sink: Sink
    made: int = 0


@dataclass
class FakeEngine:
    vocab_size: int = 1000
    step_s: float = 0.01
    max_model_len: int = 4096
    replicas: int = 2
    ranks: int = 2
    first_token_s: float = 0.0  # extra delay before a request's first token (a "prefill")
    emitted: dict[str, list[float]] = field(default_factory=dict)  # request id -> perf_counter per delta

    def __post_init__(self) -> None:
        self.model = ModelInfo("fake", "(none)", self.max_model_len, 16, "deepseek_v3")
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)
        self._thread.start()

    def submit(
        self, request_id: str, prompt_ids: list[int], sampling: dict[str, Any], sink: Sink,
        prompt: str | None = None, target: Target | None = None,
    ) -> None:
        params = sampling_params(sampling)
        with self._lock:
            if request_id in self._open:
                raise ValueError(f"request id {request_id!r} is already running")
            self._open[request_id] = _Open(request_id, sum(prompt_ids) % 9973, params.n,
                                           params.max_tokens or 16, sink)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            req = self._open.pop(request_id, None)
        if req is not None:
            req.sink(Delta(request_id, [ChoiceDelta(i, "", [], finish_reason="abort") for i in range(req.n)], True))
        return req is not None

    def token(self, seed: int, position: int) -> int:
        return (seed * 31 + position * 7) % self.vocab_size

    def _run(self) -> None:
        while not self._stop.wait(self.step_s):
            with self._lock:
                batch = list(self._open.values())
            for req in batch:
                tok = self.token(req.seed, req.made)
                req.made += 1
                last = req.made >= req.max_tokens
                if last:
                    with self._lock:
                        self._open.pop(req.request_id, None)
                choices = [ChoiceDelta(i, f" t{tok}", [tok], finish_reason="length" if last else None) for i in range(req.n)]
                self.emitted.setdefault(req.request_id, []).append(time.perf_counter())
                req.sink(Delta(req.request_id, choices, last))

    def rank_views(self) -> list[RankView]:
        with self._lock:
            open_now = len(self._open)
        per = open_now // max(1, self.replicas * self.ranks)
        return [RankView(f"decode-{r}", k, True, per, 0, 0.0) for r in range(self.replicas) for k in range(self.ranks)]

    def status(self) -> tuple[list[ReplicaState], int, int]:
        return [ReplicaState(f"decode-{r}", "both", True, 0) for r in range(self.replicas)], len(self._open), 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
