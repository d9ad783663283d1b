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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("n_q", "n_ctx", "chunk"), [
    (5, 40, 8),  # five context segments before the rows, the last one short
    (16, 48, 16),  # the context before the rows a whole number of segments
    (7, 7, 4),  # no context before the rows: one pass, whatever the segment size
    (7, 9, 4),  # two tokens before the rows, then the rows' own causal square
    (12, 20, 16),  # rows longer than the context before them: one segment of 8
    (30, 31, 4),  # more rows than a segment: the square is bigger than a segment
])
def test_prefill_over_context_segments_equals_one_pass(tiny_checkpoint, dtype: str, n_q: int, n_ctx: int,
                                                       chunk: int) -> None:
    """A prefill chunk's attention over a context expanded a segment at a time (merged by each
    segment's log-sum-exp) equals the one-pass attention over the whole expanded context."""
    model = load_model(tiny_checkpoint(arch="deepseek-v3", quant="fp8"), dtype=dtype)
    mla = model.layers[1].self_attn
    dt = getattr(torch, dtype)
    torch.manual_seed(n_q * 100 + n_ctx)
    q_nope = torch.randn(n_q, mla.heads, mla.nope, dtype=dt)
    q_pe = torch.randn(n_q, mla.heads, mla.rope_dim, dtype=dt)
    context = torch.randn(n_ctx, mla.kv_lora + mla.rope_dim, dtype=dt)
    whole = mla.attend_naive(q_nope, q_pe, context)
    mla.context_chunk = chunk
    segmented = mla.attend_naive(q_nope, q_pe, context)
    assert segmented.shape == whole.shape == (n_q, mla.heads, mla.v_dim) and segmented.dtype == dt
    # fp32: equal up to summation order; bf16: the one-pass kernel rounds P to bf16 before P.V, the
    # segments round each partial output once, so they agree to a few bf16 steps
    tol = 1e-5 if dtype == "float32" else 3e-2
    assert torch.allclose(segmented.float(), whole.float(), rtol=tol, atol=tol * whole.float().abs().max().item())
    # each row sees only the context up to its own position: later context must not change it
    if n_q > 1:
        first = mla.attend_naive(q_nope[:1], q_pe[:1], context[: n_ctx - n_q + 1])
        assert torch.allclose(segmented[:1].float(), first.float(), rtol=tol, atol=tol * first.float().abs().max().item())


def test_attention_with_lse_matches_the_definition() -> None:
    from moecluster.workers.model.mla import attention_with_lse

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 5, 24), torch.randn(3, 9, 24), torch.randn(3, 9, 24)
    scores = q @ k.transpose(-1, -2) * 0.2
    out, lse = attention_with_lse(q, k, v, False, 0.2)
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5)
    assert torch.allclose(out, torch.softmax(scores, -1) @ v, atol=1e-5)
    square = torch.randn(3, 5, 24)
    out, lse = attention_with_lse(q, square, square, True, 0.2)
    s = (q @ square.transpose(-1, -2) * 0.2).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-5)
    assert torch.allclose(out, torch.softmax(s, -1) @ square, atol=1e-5)


def test_prefill_of_no_rows_is_empty(tiny_checkpoint) -> None:
    model = load_model(tiny_checkpoint(arch="deepseek-v3", quant="fp8"), dtype="float32")
    mla = model.layers[1].self_attn
    mla.context_chunk = 4
    out = mla.attend_naive(torch.empty(0, mla.heads, mla.nope), torch.empty(0, mla.heads, mla.rope_dim),
                           torch.randn(20, mla.kv_lora + mla.rope_dim))
    assert out.shape == (0, mla.heads, mla.v_dim)
