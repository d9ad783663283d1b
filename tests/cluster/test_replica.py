"""A replica on a local Ray cluster: EP rank actors in a placement group give one process's answers."""

from __future__ import annotations

import queue

import pytest

ray = pytest.importorskip("ray")

from moecluster import LLM, SamplingParams  # noqa: E402
from moecluster.cluster.replica import NAMESPACE, Replica  # noqa: E402
from moecluster.workers.engine.engine_config import EngineConfig  # noqa: E402



def collect(replica: Replica, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    deltas: queue.SimpleQueue = queue.SimpleQueue()
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        replica.submit(f"r{i}", p, params, deltas.put)
    done = 0
    while done < len(prompts):
        d = deltas.get(timeout=120)
        assert not isinstance(d, BaseException), d
        assert d.prompt is None and d.prompt_token_ids == []  # not sent back over Ray (the deployment has it)
        tokens[d.request_id] += [t for o in d.outputs for t in o.token_ids]
        done += d.finished
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def test_ep2_replica_on_ray_equals_one_process(local_ray, tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint(num_layers=2)
    prompts = [[(5 * i + j) % 900 + 2 for j in range(3 + 8 * i)] for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    cfg = EngineConfig(model=ckpt, dtype="float32", device="cpu", block_size=16, num_kv_blocks=48)
    want = [o.outputs[0].token_ids for o in LLM(ckpt, dtype="float32", device="cpu", block_size=16,
                                                num_kv_blocks=48).generate([{"prompt_token_ids": p} for p in prompts], params)]
    replica = Replica("decode-0", cfg, ep=2, device="cpu")
    try:
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
        assert {"decode-0-rank-0", "decode-0-rank-1"} <= names
        assert collect(replica, prompts, params) == want
        assert all(h["alive"] for h in replica.health())
    finally:
        replica.shutdown()
