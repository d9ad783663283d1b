"""The `moecluster` command line, run as users run it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moecluster.cluster.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moecluster.cluster.cli", *args], capture_output=True, text=True, timeout=300)


def test_make_tiny_then_generate(tmp_path: Path) -> None:
    out = tmp_path / "k2"
    made = run("make-tiny", str(out), "--arch", "kimi-k2", "--quant", "int4", "--layers", "2")
    assert made.returncode == 0, made.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2" and cfg["quantization_config"]["format"] == "pack-quantized"
    gen = run("generate", "--model", str(out), "--prompt", "hello", "--prompt", "a longer second prompt",
              "--max-tokens", "5", "--dtype", "float32", "--json")
    assert gen.returncode == 0, gen.stderr
    rows = [json.loads(line) for line in gen.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "a longer second prompt"]
    assert all(len(r["token_ids"]) <= 5 and r["finish_reason"] in ("length", "stop") for r in rows)


def test_chat_prompt(tiny_checkpoint) -> None:
    gen = run("generate", "--model", str(tiny_checkpoint()), "--prompt", "hi", "--chat", "--max-tokens", "3", "--json")
    assert gen.returncode == 0, gen.stderr


def test_bad_model_dir_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "error" in capsys.readouterr().err


def test_bench_without_a_target_names_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert "name a benchmark" in capsys.readouterr().err


def test_serve_without_spec_or_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    assert "--spec FILE" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["status", "down"])
def test_status_and_down_without_a_server_say_so(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MOECLUSTER_STATE", str(tmp_path / "serve.json"))
    assert main([command]) == 2
    assert "no running deployment" in capsys.readouterr().err


def test_serve_cuda_spec_without_gpus_fails_at_once(tiny_checkpoint, tmp_path: Path) -> None:
    """An embedded local Ray cannot grow: a spec needing GPUs it lacks is refused, not left waiting."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model: {tiny_checkpoint()}\ndecode: {{replicas: 1, ep: 2, device: cuda}}\n")
    env = {**__import__("os").environ, "MOECLUSTER_STATE": str(tmp_path / "state.json")}
    done = subprocess.run([sys.executable, "-m", "moecluster.cluster.cli", "serve", "--spec", str(spec)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "need 2 GPU(s)" in done.stderr and "found 0" in done.stderr
