"""MLA: the absorbed decode path against the naive (expanded K/V) oracle, over a paged cache."""

from __future__ import annotations

import random

import pytest
import torch

from moecluster.kernels.mla_decode import mla_decode_reference
from moecluster.workers.model.attention_metadata import AttentionMetadata
from moecluster.workers.model.mla import gather_context
from moecluster.workers.model_loader import load_model


@pytest.mark.parametrize("arch", ["deepseek-v3", "kimi-k2"])
def test_absorbed_equals_naive(tiny_checkpoint, arch: str) -> None:
    model = load_model(tiny_checkpoint(arch=arch, quant="fp8"), dtype="float32")
    cfg = model.cfg
    mla = model.layers[1].self_attn
    block_size, lengths = 16, [1, 15, 16, 17, 70]
    rng = random.Random(0)
    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    cache = torch.zeros(num_blocks, block_size, cfg.latent_dim)
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered, non-contiguous blocks
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]
    x = torch.randn(sum(lengths), cfg.hidden_size)
    positions = [p for n in lengths for p in range(n)]
    slots = [t[p // block_size] * block_size + p % block_size for n, t in zip(lengths, tables) for p in range(n)]
    meta = AttentionMetadata.build(positions, slots, tables, lengths, lengths)
    cos, sin = model.rope(meta.positions, x.dtype)
    q_nope, q_pe, latent = mla.project(x, cos, sin)
    cache.view(-1, cfg.latent_dim)[meta.slot_mapping] = latent

    for i, n in enumerate(lengths):
        last = meta.query_starts[i] + n - 1  # the newest token of each sequence, as a decode step sees it
        context = gather_context(cache, meta.block_tables[i], n)
        naive = mla.attend_naive(q_nope[last : last + 1], q_pe[last : last + 1], context)
        absorbed = mla.attend_absorbed(
            q_nope[last : last + 1], q_pe[last : last + 1], cache, meta.block_tables[i : i + 1], meta.seq_lens[i : i + 1]
        )
        assert torch.allclose(absorbed, naive, rtol=1e-5, atol=1e-5 * naive.abs().max().item())


def test_decode_reference_masks_beyond_length() -> None:
    """Garbage in cache slots past a sequence's length must not change its output."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 24)
    cache = torch.randn(6, 8, 24)
    tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    lens = torch.tensor([10, 17])
    out = mla_decode_reference(q, cache, tables, lens, 0.3, 16)
    cache[1, 2:] = 1e4  # after token 10 of sequence 0
    cache[5, 1:] = -1e4  # after token 17 of sequence 1
    assert torch.equal(mla_decode_reference(q, cache, tables, lens, 0.3, 16), out)
