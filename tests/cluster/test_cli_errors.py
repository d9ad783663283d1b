"""Bad or unusual input to the CLI: one line naming the problem, exit 2, and nothing left running.

Every check here fails before Ray starts (in-process, no subprocess), so these run in seconds."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moecluster.cluster import serve as serve_mod
from moecluster.cluster.cli import main
from moecluster.cluster.spec import DeploymentSpec, SpecError, check_checkpoint


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def ray_never_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if the call reaches Ray or builds a deployment (an earlier test of the same
    process may have left Ray initialized, so `ray.is_initialized()` cannot tell)."""
    import ray

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the refused request reached Ray")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(serve_mod, "Deployment", refuse)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state.json"
    monkeypatch.setenv("MOECLUSTER_STATE", str(path))
    return path


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path: Path) -> Path:
    """A private copy of a tiny checkpoint, to break."""
    return Path(shutil.copytree(tiny_checkpoint(num_layers=2), tmp_path / "ckpt"))


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


# --- serve: the spec file and the checkpoint --------------------------------------------------


def test_spec_file_problems_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: /m\ndecode: {device: cpu}\n\tbad: tab\n")
    with pytest.raises(SpecError) as err:
        DeploymentSpec.from_yaml(bad)
    assert "\n" not in str(err.value) and "line 3, column 1" in str(err.value)
    with pytest.raises(SpecError, match="cannot read it: Is a directory"):
        DeploymentSpec.from_yaml(tmp_path)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\x9b\xff\xfe" * 16)
    with pytest.raises(SpecError, match="not UTF-8 text"):
        DeploymentSpec.from_yaml(binary)


def test_checkpoint_problems_are_found_before_any_rank_loads(ckpt: Path) -> None:
    assert check_checkpoint(ckpt).hidden_size > 0
    shard = ckpt / "model-00001-of-00002.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # an interrupted download
    with pytest.raises(ValueError, match="truncated"):
        check_checkpoint(ckpt)
    shard.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        check_checkpoint(ckpt)
    check_checkpoint(ckpt, weights=False)  # load_format: random reads no weights
    shard.write_bytes(whole)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = shard.name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not hold tensor 'model.extra.weight'"):
        check_checkpoint(ckpt)
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        check_checkpoint(ckpt)


def test_spec_max_model_len_beyond_the_checkpoint(ckpt: Path) -> None:
    spec = DeploymentSpec.parse({"model": str(ckpt), "decode": {"device": "cpu"}, "engine": {"max_model_len": 1 << 20}})
    with pytest.raises(SpecError, match="'engine.max_model_len'.*max_position_embeddings"):
        spec.check_paths()


def test_serve_refuses_bad_input_before_ray(ckpt: Path, tmp_path: Path, state: Path, ray_never_started: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (ckpt / "config.json").write_text(json.dumps({**json.loads((ckpt / "config.json").read_text()),
                                                  "model_type": "llama"}))
    assert main(["serve", "--model", str(ckpt)]) == 2
    line = one_error_line(capsys)
    assert "spec field 'model'" in line and "llama" in line
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model: {ckpt}\n")
    assert main(["serve", "--spec", str(spec), "--model", str(ckpt)]) == 2
    assert "not both" in one_error_line(capsys)


def test_port_in_use_is_refused_before_ray(tiny_checkpoint, state: Path, ray_never_started: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = DeploymentSpec.parse({"model": str(tiny_checkpoint(num_layers=2)), "decode": {"device": "cpu"},
                                     "router": {"grpc_port": 0, "http_port": port, "metrics_port": 0}})
        with pytest.raises(SpecError, match=f"'router.http_port': port {port} on 127.0.0.1 is already in use"):
            serve_mod.start(spec)
    assert not state.exists()


def test_unreachable_ray_address_fails_in_seconds() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="cannot reach a Ray cluster.*refused"):
        serve_mod.check_ray_reachable(f"127.0.0.1:{port}")
    with socket.socket() as silent:  # something listens but is not a gRPC server
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(RuntimeError, match="no Ray cluster answered"):
            serve_mod.check_ray_reachable(f"ray://127.0.0.1:{silent.getsockname()[1]}", timeout_s=1.0)
    assert time.monotonic() - t0 < 20


# --- status / down / the state file ------------------------------------------------------------


def test_down_never_signals_a_process_that_reused_the_pid(state: Path, sleeper, capsys) -> None:
    state.write_text(json.dumps({"pid": sleeper.pid, "started": "1", "grpc": "127.0.0.1:1", "model": "x"}))
    assert main(["status"]) == 2
    assert "no longer running" in one_error_line(capsys)
    assert main(["down"]) == 0
    assert "was not running" in capsys.readouterr().out
    assert sleeper.poll() is None and not state.exists()


def test_a_second_server_on_the_same_state_is_refused(state: Path, sleeper, tiny_checkpoint,
                                                      ray_never_started: None) -> None:
    started = serve_mod.process_started(sleeper.pid)
    state.write_text(json.dumps({"pid": sleeper.pid, "started": started, "grpc": "127.0.0.1:1", "model": "x"}))
    spec = DeploymentSpec.parse({"model": str(tiny_checkpoint(num_layers=2)), "decode": {"device": "cpu"}})
    with pytest.raises(RuntimeError, match=f"already runs \\(pid {sleeper.pid}"):
        serve_mod.start(spec)
    assert json.loads(state.read_text())["pid"] == sleeper.pid


@pytest.mark.parametrize("content", ["garbage", "[1]", "{}"])
def test_unreadable_state_file_is_one_line(content: str, state: Path, capsys) -> None:
    state.write_text(content)
    for command in ("status", "down"):
        assert main([command]) == 2
        assert str(state) in one_error_line(capsys)


# --- generate ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value"), [("--max-tokens", "0"), ("--max-tokens", "-1"), ("--temperature", "nan"),
                                             ("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5")])
def test_generate_sampling_values_are_checked_up_front(flag: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["generate", "--url", "127.0.0.1:1", "--prompt", "x", flag, value])
    assert done.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_generate_model_and_url_conflict_and_bad_checkpoints(ckpt: Path, capsys) -> None:
    assert main(["generate", "--model", str(ckpt), "--url", "auto", "--prompt", "x"]) == 2
    assert "not both" in one_error_line(capsys)
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(b"\x01" * 12)
    assert main(["generate", "--model", str(ckpt), "--prompt", "x"]) == 2
    assert "model-00002-of-00002.safetensors is not a valid safetensors file" in one_error_line(capsys)


def test_generate_on_cuda_without_cuda(tiny_checkpoint, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["generate", "--model", str(tiny_checkpoint(num_layers=2)), "--prompt", "x", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in one_error_line(capsys)


# --- make-tiny / make-slice / plan / bench -----------------------------------------------------


def test_checkpoint_writers_refuse_what_they_would_clobber(tmp_path: Path, capsys) -> None:
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "model-00001-of-000163.safetensors").write_text("a real checkpoint's shard")
    for command in ("make-tiny", "make-slice"):
        assert main([command, str(foreign)]) == 2
        assert "holds files" in one_error_line(capsys)
    assert (foreign / "model-00001-of-000163.safetensors").read_text() == "a real checkpoint's shard"
    assert not (foreign / "config.json").exists()
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(["make-tiny", str(afile)]) == 2
    assert "not a directory" in one_error_line(capsys)
    fresh = tmp_path / "fresh"
    assert main(["make-tiny", str(fresh), "--heads", "0"]) == 2  # fails after creating the directory
    assert "num_attention_heads" in one_error_line(capsys) and not fresh.exists()
    assert main(["make-slice", str(fresh), "--layers", "2"]) == 0
    assert main(["make-tiny", str(fresh), "--layers", "2"]) == 0  # a slice's files are a subset: rewritten whole
    assert main(["make-slice", str(fresh)]) == 2  # would leave the tiny shards beside a full-size config


def test_plan_odd_inputs(tmp_path: Path, capsys) -> None:
    assert main(["plan", "--model", "deepseek-v3", "--gpu", "h100", "--reserve-gib", "inf"]) == 2
    assert "finite" in one_error_line(capsys)
    assert main(["plan", "--model", "DeepSeek-V3", "--gpu", "H100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "deepseek-v3"
    (tmp_path / "config.json").write_text("[]")
    assert main(["plan", "--model", str(tmp_path), "--gpu", "h100"]) == 2
    assert "JSON object" in one_error_line(capsys)


def test_bench_a2a_top_k_beyond_experts(capsys) -> None:
    assert main(["bench", "a2a", "--device", "cpu", "--top-k", "9", "--experts", "4"]) == 2
    assert "--top-k 9 exceeds --experts 4" in one_error_line(capsys)


def test_unexpected_failures_are_one_line_without_v(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import moecluster.cluster.plan as plan

    def broken(*_: object, **__: object) -> None:
        raise TypeError("a bug\nover two lines")

    monkeypatch.setattr(plan, "make_plan", broken)
    assert main(["plan", "--model", "deepseek-v3", "--gpu", "h100"]) == 1
    line = one_error_line(capsys)
    assert "internal error: TypeError: a bug over two lines" in line and "-v" in line
    with pytest.raises(TypeError):
        main(["-v", "plan", "--model", "deepseek-v3", "--gpu", "h100"])


def test_state_records_the_process_start_time() -> None:
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("no /proc")
    assert serve_mod.process_started(os.getpid()) == serve_mod.process_started(os.getpid()) is not None
