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
