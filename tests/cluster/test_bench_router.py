"""`bench router` runs end to end at a toy size and accounts for every token."""

from __future__ import annotations

import json
import math

from moecluster.cluster.bench.router import RouterBenchConfig, main


def test_router_bench_counts_every_token(tiny_checkpoint, tmp_path) -> None:
    cfg = RouterBenchConfig(concurrency=8, requests=24, tokens=5, step_s=0.005, prompt_words=8)
    result = main(cfg, tiny_checkpoint(num_layers=2), tmp_path / "r.json")
    assert result["tokens"] == sum(5 // 2 + (i * 37) % 6 for i in range(24))
    assert 0 <= result["added_ms_p50"] <= result["added_ms_p99"] < 10_000
    assert math.isfinite(result["requests_per_s"]) and result["requests_per_s"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["config"]["concurrency"] == 8
