"""`moecluster bench engine --quick`: the JSON it writes has every number, and they are sane.

Times are checked for being measured (positive, ordered percentiles), never for being fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moecluster.cluster.bench.engine import PARTS
from moecluster.cluster.cli import main


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench-engine.json"
    assert main(["bench", "engine", "--quick", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_config_and_machine_are_recorded(result: dict) -> None:
    assert result["benchmark"] == "engine" and result["wall_s"] > 0
    cfg = result["config"]
    assert cfg["quick"] and cfg["requests"] == [8, 16] and cfg["sessions"] == 2 and cfg["turns"] == 6
    machine = result["machine"]
    assert machine["platform"] and machine["torch"] and machine["cpu_count"] >= 1


def test_step_times_are_measured_for_every_case_and_part(result: dict) -> None:
    sched = result["scheduler"]
    assert sched["target_ms"] == 2.0
    cases = sched["cases"]
    assert [(c["case"], c["running"]) for c in cases] == [("decode", 8), ("decode", 16), ("prefill-heavy", 16)]
    for c in cases:
        assert c["steps"] == 20 and set(c["parts_ms"]) == set(PARTS)
        for part, s in c["parts_ms"].items():
            if part == "graph fill" and c["case"] == "prefill-heavy":  # every step mixed: no replay
                assert s["max"] == 0, s
                continue
            assert 0 < s["p50"] <= s["p99"] <= s["max"], (c["case"], part, s)
            assert 0 < s["mean"] <= s["max"], (c["case"], part, s)
        parts = c["parts_ms"]
        assert parts["scheduler"]["mean"] == pytest.approx(
            parts["schedule"]["mean"] + parts["update"]["mean"] + parts["tokens"]["mean"]
        )
        assert parts["total"]["mean"] == pytest.approx(parts["scheduler"]["mean"] + parts["prepare"]["mean"])
        assert isinstance(c["scheduler_within_target"], bool)
    decode, _, heavy = cases
    assert decode["tokens_per_step"] == decode["running"] == decode["running_per_step"]  # all decoding, every step
    assert heavy["tokens_per_step"] > 10 * heavy["running"]  # prompt chunks ride along with the decodes


def test_prefix_cache_hits_on_the_agent_trace(result: dict) -> None:
    pc = result["prefix_cache"]
    trace, runs = pc["trace"], pc["runs"]
    assert trace["sessions"] == 2 and trace["turns"] == 6 and trace["shared_tokens"] == 1024 + 256
    assert set(runs) == {"caching on", "caching off", "small cache"}
    for name, r in runs.items():
        assert r["requests"] == 2 * 6 and len(r["per_turn"]) == 6, name
        for key in ("hit_rate", "request_hit_rate", "bound"):
            assert 0.0 <= r[key] <= 1.0, (name, key)
        assert all(0.0 <= t["hit_rate"] <= t["bound"] <= 1.0 for t in r["per_turn"]), name
        assert r["prefix_hits"] <= r["prefix_queries"]
    on, off, small = runs["caching on"], runs["caching off"], runs["small cache"]
    assert on["hit_rate"] > 0.5 and on["evictions"] == 0
    assert on["request_hit_rate"] == pytest.approx(on["hit_rate"])  # every request looked up once
    assert on["request_hit_rate"] == pytest.approx(on["bound"])  # a cache that holds everything hits all it can
    assert off["hit_rate"] == 0.0 and off["request_hit_rate"] == 0.0 and off["prefix_hits"] == 0
    assert small["num_blocks"] < on["num_blocks"] and small["evictions"] > 0
    assert small["request_hit_rate"] < on["request_hit_rate"]
    check = pc["model_check"]
    assert check["agree"] and check["model"] == check["replay"] and check["model"]["prefix_hits"] > 0


def test_bench_serve_on_gpus_without_a_gpu_says_so_before_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "serve"]) == 2
    assert "needs CUDA GPUs" in capsys.readouterr().err


def test_bench_kernels_without_a_gpu_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "kernels", "--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_without_a_target_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert "engine" in capsys.readouterr().err


def test_bad_request_counts_are_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "engine", "--requests", "64,lots", "--out", str(tmp_path / "x.json")])
