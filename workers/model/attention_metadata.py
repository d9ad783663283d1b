"""How one step's flat token batch maps onto sequences and the paged latent cache.

Sequences are laid end to end: sequence i owns rows query_starts[i] : query_starts[i] + query_lens[i]
of every (tokens, ...) activation. Its latent cache entries sit in the blocks of block_tables[i];
seq_lens[i] counts its context including this step's tokens. A sequence with one new token is a
decode (absorbed MLA); one with more is a prefill chunk (naive MLA over the expanded context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cache_slots(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The paged-cache slots (block * block_size + offset) of a sequence's positions start..end-1."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


@dataclass(frozen=True)
class AttentionMetadata:
    positions: torch.Tensor  # (tokens,) int64, position of each new token in its sequence
    slot_mapping: torch.Tensor  # (tokens,) int64, block * block_size + offset for each new token
    block_tables: torch.Tensor  # (seqs, max_blocks) int32, unused entries 0
    seq_lens: torch.Tensor  # (seqs,) int64, context length after this step
    query_lens: tuple[int, ...]  # new tokens per sequence
    query_starts: tuple[int, ...]  # first row of each sequence in the flat batch
    decode_seqs: torch.Tensor  # (decodes,) int64, sequences with one new token
    decode_rows: torch.Tensor  # (decodes,) int64, their rows in the flat batch
    prefill_seqs: tuple[int, ...]  # sequences with several new tokens
    token_mask: torch.Tensor | None = None  # (tokens,) int64, 0 on padding rows (CUDA graph batches); None: all real

    @classmethod
    def build(
        cls,
        positions: list[int],
        slot_mapping: list[int],
        block_tables: list[list[int]],
        seq_lens: list[int],
        query_lens: list[int],
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        starts, row = [], 0
        for n in query_lens:
            starts.append(row)
            row += n
        width = max((len(t) for t in block_tables), default=0) or 1
        padded = [blocks + [0] * (width - len(blocks)) for blocks in block_tables]
        table = torch.tensor(padded, dtype=torch.int32).reshape(len(block_tables), width)
        decodes = [i for i, n in enumerate(query_lens) if n == 1]
        return cls(
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            block_tables=table.to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
            query_lens=tuple(query_lens),
            query_starts=tuple(starts),
            decode_seqs=torch.tensor(decodes, dtype=torch.int64, device=device),
            decode_rows=torch.tensor([starts[i] for i in decodes], dtype=torch.int64, device=device),
            prefill_seqs=tuple(i for i, n in enumerate(query_lens) if n > 1),
        )

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])
