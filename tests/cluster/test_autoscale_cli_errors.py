"""`moecluster autoscale simulate` / `trace` with odd inputs: every one is a clear one-line error
(exit 2, naming the file or the value), never a traceback or a run that does not end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moecluster.cluster.autoscale.simulate import MAX_TICKS, PoolSetup, simulate, static_pools
from moecluster.cluster.autoscale.service_model import ServiceModel
from moecluster.cluster.autoscale.trace import TraceRequest, make_bursty_trace, write_trace
from moecluster.cluster.cli import main as cli
from moecluster.cluster.spec import ScaleBounds
from tests.cluster.test_autoscale_simulate import FixedPolicy


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli(["autoscale", *map(str, argv)])
    return code, capsys.readouterr().err


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    return write_trace(tmp_path / "t.jsonl", [TraceRequest(0, 10, 2), TraceRequest(1, 10, 3)])


def test_unreadable_inputs_are_clear_errors(tmp_path: Path, trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "a-dir"
    directory.mkdir()
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    wrong_type = tmp_path / "model.json"
    wrong_type.write_text(json.dumps({"step_base_s": "fast"}))
    out = tmp_path / "out"
    cases = [
        (("--trace", directory, "--out", out), f"trace {directory}: cannot read it"),
        (("--trace", binary, "--out", out), f"trace {binary}: not UTF-8 text"),
        (("--trace", trace, "--spec", directory, "--out", out), f"spec file {directory}: cannot read it"),
        (("--trace", trace, "--model", directory, "--out", out), f"service model file {directory}: cannot read it"),
        (("--trace", trace, "--model", wrong_type, "--out", out), "every field must be a number"),
        (("--trace", trace, "--out", a_file), f"--out {a_file}: cannot write the report there"),
    ]
    for args, message in cases:
        code, err = run_cli(capsys, "simulate", *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)


def test_absolute_timestamps_are_refused_not_simulated_for_hours(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A request log with Unix times would tick the controller 170 million times before the first
    request (and bill GPU-hours from 1970): refuse it, saying what arrival_s means."""
    epoch = write_trace(tmp_path / "epoch.jsonl", [TraceRequest(1.7e9, 10, 2), TraceRequest(1.7e9 + 1, 10, 2)])
    code, err = run_cli(capsys, "simulate", "--trace", epoch, "--out", tmp_path / "out")
    assert code == 2 and "arrival_s is seconds from the start of the trace" in err and "1.7e+09" in err
    pools = [PoolSetup("decode", "both", 1, ScaleBounds(min_replicas=1, max_replicas=2))]
    late = [TraceRequest(10.0 * MAX_TICKS * 1.01, 10, 2)]
    with pytest.raises(ValueError, match="must have the first arrival subtracted"):
        simulate(late, ServiceModel(), pools, FixedPolicy(1), interval_s=10.0)
    simulate(late, ServiceModel(), pools)  # no policy, no ticks: a static run is fine


def test_static_counts_must_name_a_pool(trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "simulate", "--trace", trace, "--static", "prefill=2", "--out", tmp_path / "out")
    assert code == 2 and "no pool named 'prefill'" in err and "its pools: decode" in err
    with pytest.raises(ValueError, match="no pool named ''"):
        static_pools([PoolSetup("decode", "both", 1)], {"": 3})


def test_policy_error_is_one_line(trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "simulate", "--trace", trace, "--policy", "not a path", "--out", tmp_path / "out")
    assert code == 2 and "--policy: must be 'slo' or a class path" in err
    assert "validation error" not in err and "errors.pydantic.dev" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (("--duration", "inf"), "duration_s=inf"),
    (("--base-rps", "nan"), "base_rps=nan"),
    (("--burst-rps", "inf"), "burst_rps=inf"),
    (("--base-rps", "0", "--burst-rps", "0"), "no requests"),
])
def test_trace_tool_refuses_what_would_hang_or_write_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str) -> None:
    out = tmp_path / "t.jsonl"
    code, err = run_cli(capsys, "trace", out, "--duration", "600", "--burst-every", "300", "--burst-len", "60",
                        "--ramp", "30", *args)
    assert code == 2 and message in err and not out.exists()


def test_trace_tool_unwritable_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "trace", tmp_path, "--duration", "60", "--burst-every", "30", "--burst-len", "5",
                        "--ramp", "0")
    assert code == 2 and f"cannot write trace {tmp_path}" in err


def test_make_bursty_trace_rejects_non_finite_values() -> None:
    with pytest.raises(ValueError, match="finite"):
        make_bursty_trace(float("inf"), 1.0, 2.0, 100.0, 10.0)
