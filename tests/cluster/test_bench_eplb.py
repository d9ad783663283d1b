"""`moecluster bench eplb --quick`: the JSON it writes has every number, and they hang together."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moecluster.cluster.bench.eplb import POLICIES, TARGET, EplbBenchConfig, record_trace, zipf_probs
from moecluster.cluster.cli import main
from moecluster.router.experts.eplb import balance
from moecluster.router.experts.placement import ExpertPlacement


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench-eplb.json"
    assert main(["bench", "eplb", "--quick", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_config_and_machine_are_recorded(result: dict) -> None:
    assert result["benchmark"] == "eplb" and result["wall_s"] > 0 and result["target"] == TARGET
    cfg, quick = result["config"], EplbBenchConfig.quick_sizes()
    assert cfg["quick"] and (cfg["experts"], cfg["ranks"], cfg["redundant"], cfg["layers"]) == (
        quick.experts, quick.ranks, quick.redundant, quick.layers)
    assert cfg["slots_per_rank"] == (cfg["experts"] + cfg["redundant"]) // cfg["ranks"]
    assert cfg["window_steps"] == cfg["tokens"] // cfg["step_tokens"] and cfg["hierarchical_applies"]
    assert result["machine"]["platform"] and result["machine"]["cpu_count"] >= 1
    assert result["mean_tokens_per_rank"] == cfg["tokens"] * cfg["top_k"] / cfg["ranks"]


def test_every_layer_has_before_and_after_for_both_policies(result: dict) -> None:
    cfg = result["config"]
    slots = cfg["ranks"] * cfg["slots_per_rank"]
    assert [r["layer"] for r in result["layers"]] == list(range(cfg["layers"]))
    for r in result["layers"]:
        assert 0 < r["hottest_share"] <= 1
        for trace in ("recorded", "fresh"):
            b = r["before"][trace]
            assert b["mean"] == pytest.approx(result["mean_tokens_per_rank"])
            assert b["ratio"] == pytest.approx(b["max"] / b["mean"]) and b["ratio"] >= 1
        for policy in POLICIES:
            p = r[policy]
            for trace in ("recorded", "fresh"):
                assert 1 <= p[trace]["ratio"] <= r["before"][trace]["ratio"] + 1e-9, (policy, trace)
                assert p[trace]["node_ratio"] >= 1
            assert 0 <= p["cross_rank"] <= p["moves"] <= slots and 0 <= p["churn"] <= slots
            assert p["ok"] == (max(p["recorded"]["ratio"], p["fresh"]["ratio"]) <= TARGET)
            assert p["rebalance_ms"] > 0 and p["max_replicas"] >= 2
        assert r["global"]["recorded"]["ratio"] <= 1.10  # skewed, but enough redundant slots


def test_overall_and_placements_agree_with_the_rows(result: dict) -> None:
    layers, overall, cfg = result["layers"], result["overall"], result["config"]
    for policy in POLICIES:
        o = overall[policy]
        assert o["moves"] == sum(r[policy]["moves"] for r in layers)
        assert o["churn"] == sum(r[policy]["churn"] for r in layers)
        assert o["ok"] == all(r[policy]["ok"] for r in layers)
        for trace in ("recorded", "fresh"):
            worst = max(r[policy][trace]["ratio"] for r in layers)
            assert o[trace]["worst_layer"] == pytest.approx(worst) and 1 <= o[trace]["ratio"] <= worst + 1e-9
        placements = [ExpertPlacement.from_dict(d) for d in result["placements"][policy]]
        contiguous = ExpertPlacement.contiguous(cfg["experts"], cfg["ranks"], cfg["redundant"])
        assert [len(contiguous.moves_to(p)) for p in placements] == [r[policy]["moves"] for r in layers]
        assert all(p.slots_per_rank == cfg["slots_per_rank"] for p in placements)
    assert overall["before"]["fresh"]["ratio"] > overall["global"]["fresh"]["ratio"]


def test_balance_matches_a_recount(tmp_path: Path) -> None:
    """Small enough to recount: the JSON's ratio is `balance` of the placement on the recorded load."""
    out = tmp_path / "e.json"
    args = ["--experts", "16", "--ranks", "4", "--redundant", "4", "--nodes", "2", "--groups", "2", "--tokens",
            "2048", "--layers", "1", "--seed", "3"]
    assert main(["bench", "eplb", "--quick", *args, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    cfg = EplbBenchConfig(**{k: v for k, v in res["config"].items()
                             if k not in ("slots_per_rank", "window_steps", "hierarchical_applies")})
    dist_rng, rec_rng = (np.random.default_rng([cfg.seed, i]) for i in range(2))
    load = record_trace(cfg, [zipf_probs(16, cfg.zipf, dist_rng)], rec_rng).totals()[0]
    placement = ExpertPlacement.from_dict(res["placements"]["global"][0])
    assert res["layers"][0]["global"]["recorded"]["ratio"] == pytest.approx(balance(placement, load))


def test_impossible_sizes_are_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "eplb", "--experts", "10", "--ranks", "4", "--redundant", "0",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "not divisible by ranks 4" in capsys.readouterr().err


def test_bench_without_a_target_names_eplb(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert "eplb" in capsys.readouterr().err
