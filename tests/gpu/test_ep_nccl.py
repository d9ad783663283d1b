"""Expert parallelism over NCCL on two GPUs: the same parity as over gloo (device tool, nvidia-h200-x2)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moecluster import LLM, SamplingParams
from tests.two_ranks import run_ranks


def _nccl_moe_worker(rank: int, world: int, port: int, queue, ckpt: str) -> None:  # noqa: ANN001
    from moecluster.router.experts.all_to_all import AllToAllDispatch
    from moecluster.router.experts.placement import ExpertPlacement
    from moecluster.workers.model_loader import load_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    full = load_model(ckpt, dtype="float32", device=device)
    placement = ExpertPlacement.contiguous(full.cfg.n_routed_experts, world, redundant_slots=2)
    sharded = load_model(ckpt, dtype="float32", device=device, expert_ids=placement.local_experts(rank),
                         dispatcher=AllToAllDispatch(placement, rank, device=device))
    g = torch.Generator(device=device).manual_seed(rank)
    worst = 0.0
    for tokens in ((0, 7, 3) if rank == 0 else (5, 0, 9)):
        x = torch.randn(tokens, full.cfg.hidden_size, device=device, generator=g)
        got, want = sharded.layers[1].mlp(x), full.layers[1].mlp(x)
        if tokens:
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    queue.put(worst)
    dist.destroy_process_group()


@pytest.mark.gpu(count=2)
def test_nccl_ep_moe_matches_local(tiny_checkpoint) -> None:
    worst = run_ranks(_nccl_moe_worker, 2, (str(tiny_checkpoint(num_layers=2, quant="int4")),), results=2, timeout=300)
    assert max(worst) <= 1e-5


@pytest.mark.gpu(count=2)
def test_nccl_ep_engine_greedy_equals_one_gpu(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint(num_layers=2)
    prompts = [{"prompt_token_ids": [(13 * i + j) % 900 + 2 for j in range(4 + 9 * i)]} for i in range(5)]
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 4 * i, ignore_eos=True) for i in range(5)]
    options = dict(dtype="float32", device="cuda", block_size=16, num_kv_blocks=48)
    want = [o.outputs[0].token_ids for o in LLM(ckpt, **options).generate(prompts, params)]
    ep = LLM(ckpt, expert_parallel_size=2, eplb_redundant_slots=2, eplb_interval_steps=4, **options)
    try:
        assert [o.outputs[0].token_ids for o in ep.generate(prompts, params)] == want
        assert sum(r.moved_slots for _, r in ep.engine.eplb_reports) > 0
    finally:
        ep.engine.shutdown()
