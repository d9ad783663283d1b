"""Runs one forward step for a set of sequences and samples one token for each.

Batch flow of a step: each sequence contributes its not-yet-computed tokens (a whole prompt, or
the one token sampled last step); they are laid end to end with their positions and cache slots
(AttentionMetadata), the model writes their latents into the paged cache and returns hidden
states, and only each sequence's last row is projected to logits and sampled.
"""

from __future__ import annotations

import torch

from moecluster.workers.engine.sampler import SamplerOutput, SamplingBatch, sample
from moecluster.workers.engine.sequence import Sequence
from moecluster.workers.model.attention_metadata import AttentionMetadata
from moecluster.workers.model.deepseek import DeepseekV3Model


class ModelRunner:
    def __init__(self, model: DeepseekV3Model, kv_caches: list[torch.Tensor], block_size: int) -> None:
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.device = model.embed_tokens.device
        self.vocab_size = model.cfg.vocab_size

    def prepare(self, seqs: list[Sequence]) -> tuple[torch.Tensor, AttentionMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for seq in seqs:
            start = seq.num_computed
            input_ids += seq.new_tokens
            for pos in range(start, len(seq.token_ids)):
                positions.append(pos)
                slots.append(seq.blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
        meta = AttentionMetadata.build(
            positions=positions,
            slot_mapping=slots,
            block_tables=[seq.blocks for seq in seqs],
            seq_lens=[len(seq.token_ids) for seq in seqs],
            query_lens=[len(seq.token_ids) - seq.num_computed for seq in seqs],
            device=self.device,
        )
        return torch.tensor(input_ids, dtype=torch.int64, device=self.device), meta

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        params = [s.params for s in seqs]
        return SamplingBatch.build(
            temperature=[p.temperature for p in params],
            top_k=[p.top_k for p in params],
            top_p=[p.top_p for p in params],
            min_p=[p.min_p for p in params],
            generators=[s.generator for s in seqs],
            num_logprobs=max((p.logprobs or 0) for p in params),
            vocab_size=self.vocab_size,
            device=self.device,
        )

    @torch.no_grad()
    def step(self, seqs: list[Sequence]) -> SamplerOutput:
        """Compute every sequence's new tokens and sample its next token (not yet appended)."""
        input_ids, meta = self.prepare(seqs)
        hidden = self.model(input_ids, meta, self.kv_caches)
        last_rows = torch.tensor(
            [start + n - 1 for start, n in zip(meta.query_starts, meta.query_lens)], device=self.device
        )
        logits = self.model.logits(hidden[last_rows])
        for seq in seqs:
            seq.num_computed = len(seq.token_ids)
        return sample(logits, self.sampling_batch(seqs))
