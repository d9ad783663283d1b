"""Recent latency samples per (signal, pool), for the autoscaler's per-interval percentiles."""

from __future__ import annotations

import threading
import time
from collections import deque

from moecluster.cluster.stats import percentile


class LatencyWindow:
    def __init__(self, horizon_s: float = 300.0, max_samples: int = 100_000) -> None:
        self.horizon_s = horizon_s
        self._samples: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        self._max = max_samples
        self._lock = threading.Lock()

    def record(self, signal: str, pool: str, value: float) -> None:
        with self._lock:
            q = self._samples.setdefault((signal, pool), deque(maxlen=self._max))
            q.append((time.monotonic(), value))

    def since(self, signal: str, pool: str, seconds: float) -> list[float]:
        cutoff = time.monotonic() - seconds
        with self._lock:
            q = self._samples.get((signal, pool))
            if not q:
                return []
            while q and q[0][0] < time.monotonic() - self.horizon_s:
                q.popleft()
            return [v for t, v in q if t >= cutoff]

    def p90(self, signal: str, pool: str, seconds: float) -> float | None:
        return percentile(self.since(signal, pool, seconds), 0.9)
