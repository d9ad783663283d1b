"""Ray pools on GPUs: a prefill replica and a decode replica on two GPUs, KV blocks GPU to GPU over
the NCCL pair group (`cluster/p2p_transfer.py`); greedy tokens equal the offline engine's, and the
decode side received every handoff (none re-prefilled). Run through the device tool on 2 GPUs."""

from __future__ import annotations

import random

import pytest

from moecluster import LLM, SamplingParams


@pytest.mark.gpu(count=2)
def test_prefill_and_decode_pools_on_two_gpus_move_kv_over_nccl(tiny_checkpoint) -> None:
    ray = pytest.importorskip("ray")
    from moecluster.cluster.deployment import Deployment
    from moecluster.cluster.replica import NAMESPACE
    from moecluster.cluster.spec import DeploymentSpec
    from tests.cluster.streams import drive

    ckpt = tiny_checkpoint(num_layers=2)
    rng = random.Random(7)
    prompts = [[rng.randrange(900) + 2 for _ in range(n)] for n in (5, 19, 40, 77, 120, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(ckpt, dtype="float32", device="cuda", block_size=16,
                                                num_kv_blocks=128).generate(
        [{"prompt_token_ids": p} for p in prompts], params)]
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    try:
        spec = DeploymentSpec.parse({
            "model": str(ckpt), "prefill": {"replicas": 1, "ep": 1, "device": "cuda"},
            "decode": {"replicas": 1, "ep": 1, "device": "cuda"},
            "cache": {"block_size": 16, "num_blocks": 128}, "engine": {"dtype": "float32"},  # kv_transfer auto: p2p
        })
        dep = Deployment(spec, health_interval_s=0.5)
        try:
            got = drive(dep, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
            assert [got[f"r{i}"] for i in range(len(prompts))] == [{0: w} for w in want]
            assert dep.transfer_outcomes() == {"received": len(prompts)}
        finally:
            dep.shutdown()
    finally:
        ray.shutdown()
