"""The autoscaling trace simulator: trace files, the replica model, the controller, the comparison.

The SLO scenario (`surge`): the default `ServiceModel` (DeepSeek-V3 on 8 x H200, 120 s replica
start-up) and the default `SLOTargets` (TTFT 2 s, ITL 0.1 s), colocated, one replica at the base
load. Traffic surges tenfold, from 2 to 20 requests/s, ramping over 10 minutes, holds 5 minutes and
ramps down. Why this is a meaningful test: one replica keeps the SLO up to about 10 requests/s, so
a fixed single replica fails the surge (asserted below), while the peak needs 3; a ramp that takes
longer than the start-up lag gives a reactive policy time to add replicas (the p90 token ITL crosses
its target at ~8.5 requests/s per replica, before requests' mean ITL does: a leading signal). A
square 10x burst instead leaves ~2 minutes during which any reactive policy is short of replicas.
The cooldown is 150 s, longer than start-up + one interval: with the default 60 s the SLO policy
asks again before its first new replicas serve, and overshoots.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from moecluster.cluster.autoscale.policy import PoolMetrics, load_policy
from moecluster.cluster.autoscale.service_model import GPU_BASE_S, ServiceModel, load_service_model
from moecluster.cluster.autoscale.sim_report import main, setup_from_spec
from moecluster.cluster.autoscale.simulate import Comparison, PoolSetup, SimResult, compare, simulate
from moecluster.cluster.autoscale.trace import (
    LengthDist,
    TraceError,
    TraceRequest,
    load_trace,
    make_bursty_trace,
    write_trace,
)
from moecluster.cluster.spec import AutoscalingSpec, DeploymentSpec, ScaleBounds

REPO = Path(__file__).resolve().parents[2]
ENGINE_BENCH = REPO / "docs" / "results" / "engine-cpu.json"
FIXED = "tests.cluster.test_autoscale_simulate:FixedPolicy"


class FixedPolicy:
    """A user policy: every pool at `replicas`, whatever the metrics say."""

    def __init__(self, replicas: int = 2) -> None:
        self.replicas = replicas

    def decide(self, metrics: Mapping[str, PoolMetrics], replicas: Mapping[str, int]) -> dict[str, int]:
        return {name: self.replicas for name in metrics}


class ScriptedPolicy:
    """`sizes[i]` for every pool at the i-th tick, then the last one."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes, self.calls = sizes, 0

    def decide(self, metrics: Mapping[str, PoolMetrics], replicas: Mapping[str, int]) -> dict[str, int]:
        size = self.sizes[min(self.calls, len(self.sizes) - 1)]
        self.calls += 1
        return {name: size for name in metrics}


def colocated(replicas: int = 1, low: int = 1, high: int = 8) -> list[PoolSetup]:
    return [PoolSetup("decode", "both", replicas, ScaleBounds(min_replicas=low, max_replicas=high))]


def sizes(result: SimResult, pool: str = "decode") -> list[int]:
    """Serving + starting after every change: what the bounds apply to."""
    return [serving + starting for _, serving, starting, _ in result.timeline[pool]]


def assert_conserved(result: SimResult, trace: list[TraceRequest]) -> None:
    assert result.completions == [1] * len(trace)
    for req, ttft, finish in zip(trace, result.ttft_s, result.finish_s):
        assert 0 < ttft and req.arrival_s + ttft <= finish <= result.end_s


# --- traces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_trace_round_trip(tmp_path: Path, suffix: str) -> None:
    trace = make_bursty_trace(120, 2, 10, 60, 20, seed=3)
    assert trace and load_trace(write_trace(tmp_path / f"t{suffix}", trace)) == trace


def test_trace_loads_sorted_and_ignores_other_fields(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"arrival_s": 2, "prompt_tokens": 5, "output_tokens": 1, "user": "a"}\n\n'
                 '{"arrival_s": 0.5, "prompt_tokens": 7.0, "output_tokens": 3}\n')
    assert load_trace(p) == [TraceRequest(0.5, 7, 3), TraceRequest(2.0, 5, 1)]


def jsonl(*rows: tuple[object, ...]) -> str:
    return "".join(json.dumps(dict(zip(("arrival_s", "prompt_tokens", "output_tokens"), row))) + "\n" for row in rows)


CSV_HEADER = "arrival_s,prompt_tokens,output_tokens\n"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.jsonl", jsonl((0, 5, 2), (1, 5)), "line 2: field 'output_tokens': missing"),
        ("t.jsonl", jsonl((0, "many", 2)), "line 1: field 'prompt_tokens': expected an integer, got 'many'"),
        ("t.jsonl", jsonl((0, 2.5, 2)), "line 1: field 'prompt_tokens': expected an integer, got 2.5"),
        ("t.jsonl", jsonl((0, "inf", 2)), "line 1: field 'prompt_tokens': expected an integer, got 'inf'"),
        ("t.jsonl", jsonl((0, 5, True)), "line 1: field 'output_tokens': expected an integer, got True"),
        ("t.jsonl", jsonl((-1, 5, 2)), "line 1: field 'arrival_s': must be >= 0, got -1"),
        ("t.jsonl", jsonl((0, 5, 0)), "line 1: field 'output_tokens': must be >= 1, got 0"),
        ("t.jsonl", jsonl((0, 5, 1)) + "{oops\n", "line 2: not valid JSON"),
        ("t.jsonl", "[1, 2, 3]\n", "line 1: expected a JSON object"),
        ("t.jsonl", "\n", "has no requests"),
        ("t.csv", "arrival_s,prompt_tokens\n0,5\n", "line 1: the CSV header lacks output_tokens"),
        ("t.csv", CSV_HEADER + "0,5,2\n1,,2\n", "line 3: field 'prompt_tokens': missing"),
        ("t.csv", CSV_HEADER + "0,5,2\nsoon,5,2\n", "line 3: field 'arrival_s': expected a number, got 'soon'"),
    ],
)
def test_trace_errors_name_line_and_field(tmp_path: Path, name: str, text: str, message: str) -> None:
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(TraceError, match=re.escape(f"trace {p} {message}")):
        load_trace(p)


def test_trace_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "nope.jsonl")


def test_bursty_trace_rates_ramps_and_lengths() -> None:
    lengths = LengthDist(100, 0.5, 10, 400)
    trace = make_bursty_trace(2400, 2, 20, 1200, 300, lengths, lengths, seed=1, ramp_s=300)
    assert trace == make_bursty_trace(2400, 2, 20, 1200, 300, lengths, lengths, seed=1, ramp_s=300)
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)

    def rate(a: float, b: float) -> float:
        return sum(a <= r.arrival_s < b for r in trace) / (b - a)

    assert rate(0, 1200) == pytest.approx(2, rel=0.15)  # base
    assert rate(1500, 1800) == pytest.approx(20, rel=0.1)  # the burst at full rate
    assert rate(1200, 1500) == pytest.approx(11, rel=0.1)  # the ramp up: mean of 2 and 20
    assert rate(2100, 2400) == pytest.approx(2, rel=0.3)  # back to the base
    assert all(10 <= r.prompt_tokens <= 400 and 10 <= r.output_tokens <= 400 for r in trace)
    with pytest.raises(ValueError, match="burst_every_s"):
        make_bursty_trace(100, 1, 2, 50, 30, ramp_s=20)


# --- the replica model ------------------------------------------------------------------------


def test_service_model_defaults_match_the_engine_bench_calibration() -> None:
    """The defaults are `from_engine_bench(engine-cpu.json)` with the default GPU costs, rounded."""
    fitted = ServiceModel.from_engine_bench(ENGINE_BENCH)
    default = ServiceModel()
    assert fitted.step_base_s >= GPU_BASE_S
    for name in ("step_base_s", "step_per_seq_s", "step_per_prefill_token_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(default, name), rel=0.05), name
    assert load_service_model(ENGINE_BENCH) == fitted
    assert ServiceModel.from_engine_bench(ENGINE_BENCH, startup_s=30).startup_s == 30


def test_service_model_file_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "model.json"
    p.write_text(json.dumps({"startup_s": 60, "gpus_per_replica": 16}))
    assert load_service_model(p) == ServiceModel(startup_s=60, gpus_per_replica=16)
    p.write_text(json.dumps({"startup": 60}))
    with pytest.raises(ValueError, match=r"unknown fields \['startup'\]"):
        load_service_model(p)
    with pytest.raises(ValueError, match="ServiceModel.max_running_seqs: must be > 0"):
        ServiceModel(max_running_seqs=0)


def test_one_request_steps_like_the_engine() -> None:
    """Idle replica: TTFT = one prefill step; every later token one decode step of batch 1."""
    model = ServiceModel()
    result = simulate([TraceRequest(1.0, 1000, 11)], model, colocated())
    assert result.ttft_s[0] == pytest.approx(model.step_s(0, 1000))
    assert result.itl_mean_s[0] == pytest.approx(model.step_s(1))
    assert result.finish_s[0] == pytest.approx(1.0 + model.step_s(0, 1000) + 10 * model.step_s(1))
    split = [PoolSetup("prefill", "prefill", 1), PoolSetup("decode", "decode", 1)]
    result = simulate([TraceRequest(1.0, 1000, 11)], model, split)
    assert result.ttft_s[0] == pytest.approx(model.step_s(0, 1000))  # streamed at the handoff
    gaps = model.handoff_s(1000) + 10 * model.step_s(1)  # the transfer delays the second token
    assert result.itl_mean_s[0] == pytest.approx(gaps / 10)


def test_chunked_prefill_and_the_sequence_limit() -> None:
    model = replace(ServiceModel(), prefill_chunk_tokens=512, max_running_seqs=2)
    trace = [TraceRequest(0.0, 1000, 5) for _ in range(3)] + [TraceRequest(0.0, 100, 1)]
    result = simulate(trace, model, colocated())
    # request 0: 512 tokens, then 488 (+ 24 of request 1's prompt): two steps
    assert result.ttft_s[0] == pytest.approx(model.step_s(0, 512) * 2)
    # the third waits for a free sequence slot: a request finishing
    assert result.ttft_s[2] > min(result.finish_s[:2])
    assert_conserved(result, trace)


def test_a_request_larger_than_the_kv_cache_is_refused() -> None:
    small = ServiceModel(kv_capacity_tokens=1000)
    with pytest.raises(ValueError, match=re.escape("request 1: prompt + output = 1010 tokens exceed")):
        simulate([TraceRequest(0, 10, 1), TraceRequest(0, 1000, 10)], small, colocated())


# --- the controller ---------------------------------------------------------------------------

def short_trace() -> list[TraceRequest]:
    """Ten minutes, 2 requests/s with two 100 s bursts at 14."""
    return make_bursty_trace(600, 2, 14, 200, 100, seed=2)


@pytest.mark.parametrize("split", [False, True], ids=["colocated", "disaggregated"])
def test_requests_are_conserved_through_scale_up_and_drain(split: bool) -> None:
    """Up to 3, then down to 1 while requests run and handoffs are in flight: each completes once."""
    trace = short_trace()
    bounds = ScaleBounds(min_replicas=1, max_replicas=4)
    pools = ([PoolSetup("prefill", "prefill", 1, bounds), PoolSetup("decode", "decode", 2, bounds)] if split
             else colocated(high=4))
    policy = ScriptedPolicy([3] * 20 + [1])
    model = replace(ServiceModel(), startup_s=30)
    result = simulate(trace, model, pools, policy, interval_s=10, cooldown_s=0)
    assert_conserved(result, trace)
    for pool in result.timeline:
        assert max(sizes(result, pool)) == 3 and sizes(result, pool)[-1] == 1
        assert any(draining for *_, draining in result.timeline[pool])  # drained with work left
    changes = {(d.pool, d.before, d.after) for d in result.decisions}
    assert ("decode", 3, 1) in changes and ("decode", 1 if not split else 2, 3) in changes
    # GPU time: each replica from its request to its removal (or the end)
    assert 0 < result.gpu_hours < 3 * len(result.timeline) * 8 * result.end_s / 3600


def test_bounds_clamp_the_policy() -> None:
    trace = short_trace()
    up = simulate(trace, ServiceModel(startup_s=20), colocated(1, 1, 3), FixedPolicy(10), cooldown_s=0)
    assert max(sizes(up)) == 3 and sizes(up)[-1] == 3
    down = simulate(trace, ServiceModel(startup_s=20), colocated(3, 2, 4), FixedPolicy(0), cooldown_s=0)
    assert min(sizes(down)) == 2 and sizes(down)[0] == 3
    assert_conserved(down, trace)


def test_cooldown_spaces_the_changes() -> None:
    trace = short_trace()
    flapping = ScriptedPolicy([1, 2] * 100)
    result = simulate(trace, ServiceModel(startup_s=5), colocated(1, 1, 2), flapping, interval_s=10, cooldown_s=45)
    times = [d.at_s for d in result.decisions]
    assert len(times) >= 5
    assert all(b - a >= 45 for a, b in zip(times, times[1:]))
    assert_conserved(result, trace)


def test_a_static_run_bills_every_replica_for_the_whole_run() -> None:
    trace = short_trace()
    result = simulate(trace, ServiceModel(), [PoolSetup("decode", "both", 3)], label="static")
    assert result.decisions == [] and sizes(result) == [3, 3]
    assert result.gpu_hours == pytest.approx(3 * 8 * result.end_s / 3600)


# --- the SLO policy against static provisioning -----------------------------------------------

SURGE_AUTOSCALING = AutoscalingSpec(decode=ScaleBounds(min_replicas=1, max_replicas=8), cooldown_s=150)


@pytest.fixture(scope="module")
def surge() -> tuple[list[TraceRequest], Comparison]:
    trace = make_bursty_trace(3600, 2, 20, burst_every_s=1800, burst_len_s=300, ramp_s=600, seed=0)
    return trace, compare(trace, ServiceModel(), colocated(), SURGE_AUTOSCALING)


def test_slo_policy_meets_targets_with_fewer_gpu_hours_than_static(surge: tuple[list[TraceRequest], Comparison]) -> None:
    trace, c = surge
    targets = SURGE_AUTOSCALING.targets
    policy, static = c.policy.attainment(targets), c.static.attainment(targets)
    assert policy["slo"] >= 0.95 and static["slo"] >= 0.95
    assert c.static_replicas["decode"] == max(c.policy.peak_serving()["decode"], 1) >= 3
    assert c.policy.gpu_hours < 0.7 * c.static.gpu_hours
    single = simulate(trace, ServiceModel(), [PoolSetup("decode", "both", 1)], label="one")
    assert single.attainment(targets)["slo"] < 0.5  # the surge does need more replicas


def test_slo_policy_run_respects_bounds_and_cooldown(surge: tuple[list[TraceRequest], Comparison]) -> None:
    trace, c = surge
    assert_conserved(c.policy, trace)
    assert_conserved(c.static, trace)
    assert all(1 <= n <= 8 for n in sizes(c.policy))
    ups = [d for d in c.policy.decisions if d.after > d.before]
    downs = [d for d in c.policy.decisions if d.after < d.before]
    assert ups and downs and sizes(c.policy)[-1] == 1
    times = [d.at_s for d in c.policy.decisions]
    assert all(b - a >= SURGE_AUTOSCALING.cooldown_s for a, b in zip(times, times[1:]))


# --- the command ------------------------------------------------------------------------------


def write_spec(path: Path, autoscaling: str, pools: str = "decode: {replicas: 1, ep: 8}") -> Path:
    path.write_text(f"model: /unused\n{pools}\nautoscaling:\n{autoscaling}")
    return path


def test_user_policy_class_path_is_loaded_and_used() -> None:
    autoscaling = AutoscalingSpec(policy=FIXED, options={"replicas": 3}, interval_s=5,
                                  decode=ScaleBounds(min_replicas=1, max_replicas=4))
    policy = load_policy(autoscaling)
    assert isinstance(policy, FixedPolicy) and policy.replicas == 3
    trace = make_bursty_trace(300, 2, 6, 100, 50, seed=4)
    c = compare(trace, ServiceModel(startup_s=10), colocated(high=4), autoscaling)
    assert c.policy.peak_serving() == {"decode": 3} and c.static_replicas == {"decode": 3}
    assert [(d.at_s, d.before, d.after) for d in c.policy.decisions] == [(5.0, 1, 3)]


def test_main_with_a_user_policy_in_the_spec(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    trace = write_trace(tmp_path / "t.csv", make_bursty_trace(300, 2, 6, 100, 50, seed=4))
    spec = write_spec(tmp_path / "spec.yaml", f"  policy: {FIXED}\n  options: {{replicas: 3}}\n"
                                              "  decode: {min_replicas: 1, max_replicas: 4}\n  interval_s: 5\n")
    data = main(trace, spec, out_dir=tmp_path / "out", model=ServiceModel(startup_s=10))
    assert data["autoscaling"]["policy"] == FIXED and data["autoscaling"]["options"] == {"replicas": 3}
    assert data["policy"]["peak_serving"] == {"decode": 3} and data["static_replicas"] == {"decode": 3}
    assert data["policy"]["decisions"] == [{"at_s": 5.0, "pool": "decode", "before": 1, "after": 3}]


def test_policy_option_replaces_the_specs(tmp_path: Path) -> None:
    spec = DeploymentSpec.from_yaml(write_spec(tmp_path / "slo.yaml", "  decode: {min_replicas: 1, max_replicas: 4}\n"))
    pools, autoscaling, _ = setup_from_spec(spec, FIXED, ServiceModel())
    assert autoscaling.policy == FIXED and autoscaling.decode == ScaleBounds(min_replicas=1, max_replicas=4)
    assert isinstance(load_policy(autoscaling), FixedPolicy)
    assert pools == [PoolSetup("decode", "both", 1, ScaleBounds(min_replicas=1, max_replicas=4))]


def test_main_without_a_spec_writes_report_and_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    trace = write_trace(tmp_path / "t.jsonl", make_bursty_trace(300, 2, 6, 100, 50, seed=4))
    data = main(trace, policy=FIXED, out_dir=tmp_path / "out", model=ServiceModel(startup_s=10),
                static_replicas={"decode": 4})
    assert data["policy"]["peak_serving"] == {"decode": 2} and data["static_replicas"] == {"decode": 4}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["static"]["gpu_hours"] == pytest.approx(4 * 8 * report["static"]["end_s"] / 3600)
    assert len(report["policy"]["per_request"]["ttft_s"]) == report["trace"]["requests"]
    assert (tmp_path / "out" / "replicas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_disaggregated_spec(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    trace = write_trace(tmp_path / "t.jsonl", make_bursty_trace(300, 2, 6, 100, 50, seed=4))
    spec = write_spec(tmp_path / "spec.yaml", "  prefill: {min_replicas: 1, max_replicas: 3}\n",
                      pools="prefill: {replicas: 1, ep: 8}\ndecode: {replicas: 1, ep: 8}\n"
                            "engine: {max_num_seqs: 64, max_num_batched_tokens: 2048}")
    data = main(trace, spec, out_dir=tmp_path / "out")
    assert {p["name"]: p["role"] for p in data["pools"]} == {"decode": "decode", "prefill": "prefill"}
    assert data["model"]["max_running_seqs"] == 64 * 8 and data["model"]["prefill_chunk_tokens"] == 2048 * 8
    assert data["policy"]["completed"] == data["trace"]["requests"]
    assert data["pools"][0]["bounds"] is None  # decode: no bounds, a fixed size


def test_spec_and_policy_errors(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", [TraceRequest(0, 10, 2)])
    spec = write_spec(tmp_path / "spec.yaml", "  decode: {max_replicas: 2}\n", pools="decode: {replicas: 1, ep: 16}")
    with pytest.raises(ValueError, match="decode.ep: 16 GPUs per replica, but the service model describes 8"):
        main(trace, spec, out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="class path"):
        main(trace, policy="not a path", out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="cannot load 'tests.cluster.nothing:Here'"):
        main(trace, policy="tests.cluster.nothing:Here", out_dir=tmp_path / "out")


def test_a_missing_matplotlib_is_a_clear_error_after_the_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    trace = write_trace(tmp_path / "t.jsonl", [TraceRequest(0, 10, 2), TraceRequest(1, 10, 3)])
    with pytest.raises(RuntimeError, match="needs matplotlib"):
        main(trace, out_dir=tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["policy"]["completed"] == 2
