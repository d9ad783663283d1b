"""The engine on CUDA: same greedy tokens as transformers on the CPU, NCCL KV transfer between GPUs.

Run through the device tool (`python -m pytest -m gpu`); skipped on machines without CUDA.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from moecluster import LLM, SamplingParams
from tests.reference import greedy_reference, load_reference
from tests.two_ranks import run_two_ranks


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "fp8", "int4"])
def test_cuda_fp32_greedy_equals_cpu_reference(tiny_checkpoint, tmp_path, quant: str) -> None:
    ckpt = tiny_checkpoint(arch="kimi-k2" if quant == "int4" else "deepseek-v3", quant=quant)
    rng = random.Random(quant)
    prompts = [[rng.randrange(1000) for _ in range(n)] for n in (3, 17, 33, 90)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    llm = LLM(ckpt, dtype="float32", device="cuda", block_size=16, num_kv_blocks=64)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    reference = load_reference(ckpt, tmp_path / "ref")
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == greedy_reference(reference, prompt, 32)[0]


@pytest.mark.gpu
def test_cuda_disaggregated_and_bf16_run(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint()
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (4, 40, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    one = LLM(ckpt, dtype="float32", device="cuda", block_size=16, num_kv_blocks=64).generate(prompts, params)
    two = LLM(ckpt, dtype="float32", device="cuda", block_size=16, num_kv_blocks=64, disaggregate=True).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in one] == [o.outputs[0].token_ids for o in two]
    bf16 = LLM(ckpt, dtype="bfloat16", device="cuda", block_size=16, num_kv_blocks=64).generate(prompts, params)
    assert all(len(o.outputs[0].token_ids) == 12 for o in bf16)


def _nccl_worker(rank: int, port: int, queue) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from moecluster.workers.transfer.kv_transfer import DistributedTransfer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    g = torch.Generator(device="cuda").manual_seed(0)
    src = [torch.randn(16, 8, 24, device="cuda", generator=g) for _ in range(3)]
    # The KV payloads get a group of their own: on NCCL, point-to-point ops are serialized with
    # every other op of their group, so sharing one with the control plane can deadlock.
    t = DistributedTransfer(peer=1 - rank, group=dist.new_group([0, 1]))
    if rank == 0:
        tickets = [t.send(src, [3, 9, 1]), t.send(src, [15])]
        dist.broadcast_object_list(tickets, src=0)
        dist.barrier()
        for ticket in tickets:
            t.release(ticket)
        queue.put([c[[3, 9, 1, 15]].cpu().tolist() for c in src])
    else:
        tickets = [None, None]
        dist.broadcast_object_list(tickets, src=0)
        dst = [torch.zeros(16, 8, 24, device="cuda") for _ in range(3)]
        t.receive(tickets[0], dst, [0, 1, 2])
        t.receive(tickets[1], dst, [7])
        dist.barrier()
        queue.put([c[[0, 1, 2, 7]].cpu().tolist() for c in dst])
    dist.destroy_process_group()


@pytest.mark.gpu(count=2)
def test_nccl_kv_transfer_between_gpus() -> None:
    a, b = run_two_ranks(_nccl_worker, results=2, timeout=240)
    assert a == b


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_prefill_over_context_segments(dtype: str) -> None:
    """On CUDA the segmented prefill attention takes the fused kernels' log-sum-exps (flash for
    bf16, memory-efficient for fp32): equal to the one-pass attention over the whole context, at
    K2-Thinking's MLA shapes (64 heads, 192 / 128 head dims, latent 512 + 64), 600 rows over 2600
    tokens in segments of 512."""
    from moecluster.cluster.bench.slice_model import slice_config
    from moecluster.workers.config import ModelConfig
    from moecluster.workers.model.mla import MLA

    cfg = ModelConfig.from_hf(slice_config("kimi-k2-thinking", layers=2))
    dt = getattr(torch, dtype)
    with torch.device("cuda"):
        mla = MLA(cfg, "model.layers.0.self_attn", None, dt)
    g = torch.Generator(device="cuda").manual_seed(0)
    for w in (mla.w_uk, mla.w_uv):
        w.copy_(torch.randn(w.shape, generator=g, device="cuda") * 0.05)
    n_q, n_ctx = 600, 2600
    q_nope = torch.randn(n_q, mla.heads, mla.nope, dtype=dt, device="cuda", generator=g)
    q_pe = torch.randn(n_q, mla.heads, mla.rope_dim, dtype=dt, device="cuda", generator=g)
    context = torch.randn(n_ctx, mla.kv_lora + mla.rope_dim, dtype=dt, device="cuda", generator=g)
    whole = mla.attend_naive(q_nope, q_pe, context).float()
    mla.context_chunk = 512
    parts = mla.attend_naive(q_nope, q_pe, context).float()
    assert torch.isfinite(parts).all()
    tol = 1e-4 if dtype == "float32" else 3e-2
    assert torch.allclose(parts, whole, rtol=tol, atol=tol * whole.abs().max().item())
