"""Serving metrics: what the rank actors and the deployment record, checked through a fake backend."""

from __future__ import annotations

import time

from moecluster.cluster.metrics import RequestTimer, publish_engine_stats
from moecluster.workers.engine.engine_core import EngineStats


class Recorder:
    def __init__(self) -> None:
        self.gauges: dict[str, float] = {}
        self.counts: dict[tuple, float] = {}
        self.observed: dict[str, list[float]] = {}

    def gauge(self, name: str, value: float, tags: dict[str, str]) -> None:
        self.gauges[name] = value

    def count(self, name: str, value: float, tags: dict[str, str]) -> None:
        key = (name, tags.get("finish_reason"))
        self.counts[key] = self.counts.get(key, 0) + value

    def observe(self, name: str, value: float, tags: dict[str, str]) -> None:
        self.observed.setdefault(name, []).append(value)


def stats(preemptions: int) -> EngineStats:
    return EngineStats(num_running=3, num_waiting=2, kv_usage=0.25, kv_capacity_tokens=640, num_blocks=40,
                       num_free_blocks=30, prefix_hit_rate=0.5, num_preemptions=preemptions, num_steps=9)


def test_engine_gauges_and_preemption_counter() -> None:
    rec = Recorder()
    last = publish_engine_stats(rec, stats(4), {"rank": "0"}, 0)
    last = publish_engine_stats(rec, stats(7), {"rank": "0"}, last)
    assert rec.gauges["moecluster_running_seqs"] == 3 and rec.gauges["moecluster_waiting_seqs"] == 2
    assert rec.gauges["moecluster_kv_blocks_used"] == 10 and rec.gauges["moecluster_kv_blocks_free"] == 30
    assert rec.gauges["moecluster_prefix_hit_rate"] == 0.5
    assert rec.counts[("moecluster_preemptions_total", None)] == 7 and last == 7


def test_request_timer() -> None:
    rec = Recorder()
    timer = RequestTimer(rec, {"model": "m"})
    time.sleep(0.02)
    timer.on_tokens(1)
    time.sleep(0.01)
    timer.on_tokens(2)
    timer.on_tokens(0)
    timer.on_finish("length")
    assert len(rec.observed["moecluster_ttft_seconds"]) == 1 and rec.observed["moecluster_ttft_seconds"][0] >= 0.02
    assert len(rec.observed["moecluster_itl_seconds"]) == 1 and 0.004 <= rec.observed["moecluster_itl_seconds"][0] < 1
    assert rec.counts[("moecluster_requests_total", "length")] == 1
