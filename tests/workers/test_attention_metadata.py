"""The batch builders of attention_metadata.py against their per-element definitions."""

from __future__ import annotations

import random

import torch

from moecluster.workers.model.attention_metadata import AttentionMetadata, cache_slots, int_tensor, padded_table


def test_cache_slots_run_per_block_equal_the_per_position_definition() -> None:
    rng = random.Random(0)
    for _ in range(500):
        bs = rng.choice([1, 2, 16, 64])
        blocks = rng.sample(range(10_000), rng.randint(1, 20))
        start = rng.randrange(len(blocks) * bs)
        end = rng.randint(start, len(blocks) * bs)
        assert cache_slots(blocks, start, end, bs) == [blocks[p // bs] * bs + p % bs for p in range(start, end)]


def test_padded_table_and_int_tensor() -> None:
    rows = [[5, 9, 2], [7], [], [1, 2, 3, 4]]
    table = padded_table(rows)
    assert table.dtype == torch.int32 and table.tolist() == [[5, 9, 2, 0], [7, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4]]
    assert padded_table([]).shape == (0, 1) and padded_table([[]]).tolist() == [[0]]
    t = int_tensor([3, 1 << 40, -2], "cpu")
    assert t.dtype == torch.int64 and t.tolist() == [3, 1 << 40, -2]
    assert int_tensor([], "cpu").shape == (0,)
    meta = AttentionMetadata.build([0, 1, 2, 7], [16, 17, 18, 39], [[1], [2, 4]], [3, 8], [3, 1])
    assert meta.block_tables.tolist() == [[1, 0], [2, 4]] and meta.query_starts == (0, 3)
    assert meta.decode_seqs.tolist() == [1] and meta.decode_rows.tolist() == [3] and meta.prefill_seqs == (0,)


def test_decode_view_is_gathered_once() -> None:
    """A mixed step's layers all read the same gathered tables and lengths of its decodes (one
    object each, so the MLA decode kernel's plan is made once a step)."""
    meta = AttentionMetadata.build(
        positions=[0, 1, 2, 7, 4], slot_mapping=[0, 1, 2, 3, 4], block_tables=[[5, 6], [7], [8, 9]],
        seq_lens=[3, 8, 5], query_lens=[3, 1, 1],
    )
    tables, lens = meta.decode_view
    assert meta.decode_view[0] is tables and meta.decode_view[1] is lens
    assert lens.tolist() == [8, 5] and tables.tolist() == [[7, 0], [8, 9]]
