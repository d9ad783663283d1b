"""Expert-parallel MoE over gloo equals the single-process MoE layer.

Ranks get different numbers of tokens (rank 0 none at all), placements with and without
redundant replicas; every rank's output must match the full local MoE on its own tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.two_ranks import run_ranks


def _ep_worker(rank: int, world: int, port: int, queue, ckpt: str, redundant: int, dtype: str) -> None:  # noqa: ANN001
    from moecluster.router.experts.all_to_all import AllToAllDispatch
    from moecluster.router.experts.placement import ExpertPlacement
    from moecluster.workers.model_loader import load_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    full = load_model(ckpt, dtype=dtype)
    placement = ExpertPlacement.contiguous(full.cfg.n_routed_experts, world, redundant_slots=redundant)
    sharded = load_model(ckpt, dtype=dtype, expert_ids=placement.local_experts(rank),
                         dispatcher=AllToAllDispatch(placement, rank))
    g = torch.Generator().manual_seed(100 + rank)
    worst = 0.0
    for step in range(3):
        tokens = (rank * 5 + step * 3) % 11 if rank else 0  # rank 0 sends nothing, others vary
        x = torch.randn(tokens, full.cfg.hidden_size, generator=g).to(full.dtype)
        for layer in (1,):
            got, want = sharded.layers[layer].mlp(x), full.layers[layer].mlp(x)
            scale = want.abs().max().item() if tokens else 1.0
            worst = max(worst, (got - want).abs().max().item() / scale if tokens else 0.0)
    queue.put((rank, worst))
    dist.destroy_process_group()


@pytest.mark.parametrize(("world", "redundant", "dtype"), [(2, 0, "float32"), (4, 4, "float32"), (2, 2, "bfloat16")])
def test_ep_moe_matches_local(tiny_checkpoint, world: int, redundant: int, dtype: str) -> None:
    ckpt: Path = tiny_checkpoint(quant="int4" if redundant else "none", num_layers=2)
    results = dict(run_ranks(_ep_worker, world, (str(ckpt), redundant, dtype), results=world, timeout=180))
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert set(results) == set(range(world))
    assert max(results.values()) <= tol, results


def test_weighted_sum_adds_each_tokens_rows_in_fp32_once() -> None:
    """`weighted_sum` (both dispatchers' combine): rows in sorted order are gathered back to their
    (token, choice) pairs and summed with the weights in fp32, rounded once to the rows' dtype."""
    from moecluster.router.experts.dispatch import inverse_order, weighted_sum

    gen = torch.Generator().manual_seed(4)
    tokens, top_k, hidden = 5, 3, 16
    order = torch.randperm(tokens * top_k, generator=gen)  # sorted row -> pair
    assert torch.equal(order[inverse_order(order)], torch.arange(tokens * top_k))
    pair_rows = torch.randn(tokens * top_k, hidden, generator=gen).to(torch.bfloat16)  # row of each pair
    weights = torch.rand(tokens, top_k, generator=gen)
    got = weighted_sum(pair_rows[order], inverse_order(order), weights)
    want = (pair_rows.float().view(tokens, top_k, hidden) * weights[..., None]).sum(1).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=float(want.float().abs().max()) * 2**-8)
    assert weighted_sum(pair_rows[:0], inverse_order(order[:0]), weights[:0]).shape == (0, hidden)
