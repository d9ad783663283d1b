"""Runs one scheduled step on the device: builds the flat batch, runs the model, samples.

Batch flow: each scheduled sequence contributes its next `num_tokens` uncomputed tokens (a
prompt chunk, a recompute after preemption, or the one token sampled last step); they are laid
end to end with their positions and cache slots (AttentionMetadata); the model writes their
latents into the paged cache and returns hidden states; fork copies of partial blocks happen
after that write; only the rows of sequences that sample are projected to logits.

Decode-only batches replay a captured CUDA graph of the forward when the runner has one
(`cuda_graphs.DecodeGraphs`); the logits and sampling run eagerly after it either way. Nothing
here waits for the device: host-to-device copies come from pinned memory without blocking (the
sampling settings are built after the forward is launched), and what the sampler decides per
batch is decided from the host's copy of the settings, so the host can launch a step while the
one before it is still in flight (asynchronous scheduling, `engine_core.py`).
"""

from __future__ import annotations

import torch

from moecluster.workers.engine.cuda_graphs import DecodeGraphs, PrevTokens
from moecluster.workers.engine.sampler import SamplerOutput, SamplingBatch, sample, to_device
from moecluster.workers.engine.scheduler import ScheduledSeq, SchedulerOutput
from moecluster.workers.engine.sequence import Sequence
from moecluster.workers.model.attention_metadata import AttentionMetadata, cache_slots, int_tensor
from moecluster.workers.model.deepseek import DeepseekV3Model


class ModelRunner:
    def __init__(
        self, model: DeepseekV3Model, kv_caches: list[torch.Tensor], block_size: int, graphs: DecodeGraphs | None = None
    ) -> None:
        self.model, self.kv_caches, self.block_size, self.graphs = model, kv_caches, block_size, graphs
        self.device = model.embed_tokens.device
        self.vocab_size = model.cfg.vocab_size

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, AttentionMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        bs = self.block_size
        for s in scheduled:
            seq, start = s.seq, s.seq.num_computed
            end = start + s.num_tokens
            blocks = seq.table.block_ids
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += cache_slots(blocks, start, end, bs)
        meta = AttentionMetadata.build(
            positions=positions,
            slot_mapping=slots,
            block_tables=[s.seq.table.block_ids for s in scheduled],
            seq_lens=[s.seq.num_computed + s.num_tokens for s in scheduled],
            query_lens=[s.num_tokens for s in scheduled],
            device=self.device,
        )
        return int_tensor(input_ids, self.device), meta

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        for seq in seqs:
            if seq.generator is None and seq.params.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed + seq.sample_index)
        params = [s.params for s in seqs]
        return SamplingBatch.build(
            temperature=[p.temperature for p in params],
            top_k=[p.top_k for p in params],
            top_p=[p.top_p for p in params],
            min_p=[p.min_p for p in params],
            generators=[s.generator for s in seqs],  # type: ignore[misc]
            num_logprobs=max((p.logprobs or 0 for p in params), default=0),
            vocab_size=self.vocab_size,
            device=self.device,
        )

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src, dst = to_device(torch.tensor(copies), self.device).T
        for cache in self.kv_caches:
            cache[dst] = cache[src]

    def replays(self, sched: SchedulerOutput, graph_size: int | None = None) -> bool:
        """Whether `execute` runs this step from a decode graph (else eagerly)."""
        graphs = self.graphs
        return graph_size is not None or (graphs is not None and not graphs.grouped and graphs.can_run(sched.scheduled))

    @torch.no_grad()
    def execute(
        self, sched: SchedulerOutput, graph_size: int | None = None, prev: PrevTokens | None = None
    ) -> SamplerOutput:
        """Compute the scheduled tokens; sample one token for every entry of sched.samplers.
        graph_size: replay the decode graph of that size (an expert-parallel group's choice for
        this step); without it a rank of its own replays whenever its batch allows.
        prev: input tokens still on the device (asynchronous scheduling), graph replays only."""
        if self.replays(sched, graph_size):
            assert self.graphs is not None
            hidden = self.graphs.run(sched.scheduled, graph_size, prev)  # row i = scheduled[i]'s one token
            rows = [r for _, r in sched.samplers]
        else:
            if prev is not None:
                raise RuntimeError("an eager step reads its input tokens on the host; finish the previous step first")
            input_ids, meta = self.prepare(sched.scheduled)
            rows = [meta.query_starts[r] + meta.query_lens[r] - 1 for _, r in sched.samplers]
            hidden = self.model(input_ids, meta, self.kv_caches)
        if rows != list(range(hidden.shape[0])):  # not every row samples: gather those that do
            hidden = hidden[to_device(torch.tensor(rows, dtype=torch.int64), self.device)]
        self.copy_blocks(sched.block_copies)
        # Built while the GPU runs the forward: its one host-to-device copy is from pinned memory
        # and does not block (on the decode-graph path nothing before it does either).
        batch = self.sampling_batch([seq for seq, _ in sched.samplers])
        return sample(self.model.logits(hidden), batch)
