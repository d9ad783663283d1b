"""The EP decode profiler (scripts/profile_ep_decode.py -> cluster/bench/ep_profile.py) at toy size over gloo: two rank processes step through the real
lockstep loop, and each reports its decode step phases and busiest ops (the GPU run reads the
same report with CUDA kernels)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecluster.cluster.bench import ep_profile as mod


def test_profile_ep_decode_two_gloo_ranks(tiny_checkpoint, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(num_layers=2)
    out = tmp_path / "ep.json"
    reports = mod.main(["--world", "2", "--device", "cpu", "--model", str(ckpt), "--concurrency", "4",
                        "--context", "12", "--warm", "2", "--steps", "3", "--out", str(out)])
    assert [r["rank"] for r in reports] == [0, 1] and out.exists()
    for r in reports:
        assert r["wall_ms_per_step"] > 0 and r["busy_ms_per_step"] > 0
        assert {"step", "schedule", "sync"} <= set(r["phases_p50_ms"]), r["phases_p50_ms"]
        times = [e["ms_per_step"] for e in r["top"]]
        assert times and times == sorted(times, reverse=True) and times[0] > 0 and sum(times) <= r["busy_ms_per_step"] + 1e-6
    with pytest.raises(SystemExit, match="--model"):
        mod.main(["--device", "cpu"])
    with pytest.raises(SystemExit, match="--steps"):
        mod.main(["--device", "cpu", "--steps", "0"])


@pytest.mark.gpu(count=2)
def test_profile_ep_decode_two_cuda_ranks_replay_graphs_on_their_own_gpu(tiny_checkpoint, tmp_path: Path) -> None:
    """Rank 1 sees both GPUs and steps on a thread of its own: its decode graphs must replay (and
    their input copies be fenced) on cuda:1, not on the thread's default device (the 2 x H200 run
    of session 6 failed here: "Event device 1 does not match recording stream's device")."""
    ckpt = tiny_checkpoint(num_layers=2)
    reports = mod.main(["--world", "2", "--device", "cuda", "--model", str(ckpt), "--concurrency", "4",
                        "--context", "12", "--warm", "2", "--steps", "3", "--top", "5"])
    assert [r["rank"] for r in reports] == [0, 1]
    assert all("error" not in r and r["wall_ms_per_step"] > 0 for r in reports), reports
