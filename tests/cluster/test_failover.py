"""Failover on a local Ray cluster: killing a rank actor mid-stream loses and repeats nothing."""

from __future__ import annotations

import queue
import time

import pytest

ray = pytest.importorskip("ray")

from moecluster import LLM, SamplingParams  # noqa: E402
from moecluster.cluster.deployment import Deployment  # noqa: E402
from moecluster.cluster.replica import NAMESPACE  # noqa: E402
from moecluster.cluster.spec import DeploymentSpec  # noqa: E402

REQUESTS = 16
NEW_TOKENS = 24



def test_killed_rank_streams_continue_exactly(local_ray, tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint(num_layers=2)
    prompts = [[(3 * i + j) % 900 + 2 for j in range(5 + 4 * i)] for i in range(REQUESTS)]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    engine = dict(dtype="float32", block_size=16, num_kv_blocks=96)
    want = [o.outputs[0].token_ids for o in LLM(ckpt, device="cpu", **engine).generate(
        [{"prompt_token_ids": p} for p in prompts], params)]

    spec = DeploymentSpec.parse({
        "model": str(ckpt),
        "decode": {"replicas": 2, "ep": 2, "device": "cpu"},
        "cache": {"block_size": 16, "num_blocks": 96},
        "engine": {"dtype": "float32"},
    })
    dep = Deployment(spec, health_interval_s=0.5)
    try:
        deltas: queue.SimpleQueue = queue.SimpleQueue()
        for i, p in enumerate(prompts):
            dep.submit(f"r{i}", p, params, deltas.put)
        dep.submit("pair", prompts[3], params.model_copy(update={"n": 2}), deltas.put)  # two greedy samples
        got: dict[str, list[int]] = {f"r{i}": [] for i in range(REQUESTS)}
        pair: dict[int, list[int]] = {0: [], 1: []}
        finished, killed = 0, False
        while finished < REQUESTS + 1:
            d = deltas.get(timeout=180)
            assert not isinstance(d, BaseException), d
            if d.request_id == "pair":
                for o in d.outputs:
                    pair[o.index] += o.token_ids
            else:
                got[d.request_id] += [t for o in d.outputs for t in o.token_ids]
            finished += d.finished
            if not killed and sum(map(len, got.values())) > REQUESTS * 4:
                ray.kill(ray.get_actor("decode-0-rank-1", namespace=NAMESPACE))  # mid-stream
                killed = True
        assert killed and dep.failovers > 0
        assert [got[f"r{i}"] for i in range(REQUESTS)] == want
        assert pair == {0: want[3], 1: want[3]}
        deadline = time.time() + 120
        while time.time() < deadline and not all(s["healthy"] for s in dep.status()):
            time.sleep(0.5)
        assert all(s["healthy"] for s in dep.status())  # the group came back
    finally:
        dep.shutdown()
