"""CUDA graphs for decode steps: the model's forward over one new token per sequence, captured
once per batch size and replayed, instead of launched op by op.

Why: a decode step launches several hundred kernels (per layer the MLA projections, the gate,
dispatch, the fused experts, combine); issuing them from Python costs milliseconds of host time
per step, more than the GPU needs at small batches, and at any batch the GPU waits while the host
catches up. A replay is one launch.

- Batch sizes (`graph_batch_sizes`): 1, 2, 4, 8, then every 16 up to 128, every 32 above, and
  the largest itself. A step of n sequences replays the smallest size >= n; rows past n are
  padding.
- Static inputs: every graph reads the same device buffers (token ids, positions, cache slots,
  context lengths, the token mask; a sixth row, the rows of `PrevTokens`, is read before the
  replay, not by the graph) and one block table as wide as the longest sequence allowed
  (max_model_len). The MLA decode kernel plans its work on the GPU from each step's lengths
  (`kernels/mla_schedule.py`), so a graph replays each step's own plan, whatever the table's
  width.
  A step writes its rows into pinned host buffers and copies them over without a host sync.
  Under asynchronous scheduling a row's input token may not have reached the host yet: it is
  then taken on the device from the previous step's samples (`PrevTokens`) before the replay.
- Padding rows: token 0 at position 0 with context length 1, writing its latent into the scratch
  block (one cache block past those the block manager hands out) and reading only that block;
  their MoE choices run but EPLB does not count them (token mask 0). Their outputs are not read.
- Capture: largest size first, all sizes sharing one memory pool; each size runs once eagerly
  on a side stream first (Triton compiles its kernels, cuBLAS picks its workspaces).
- Expert parallelism: the eager all-to-all needs its counts on the host, so the graphs are
  captured with each MoE layer's `AllToAllDispatch` swapped for a `GatherDispatch` over the same
  placement (all-gather, local experts, reduce-scatter: sizes known from the batch alone). Every
  rank of the group must replay the same size in the same step: the lockstep loop agrees on it
  (`lockstep_loop`), a rank with nothing scheduled replays an all-padding batch, and any rank
  with a prefill chunk makes the whole step eager. After EPLB moves experts,
  `sync_placement` points the captured dispatchers at the new placement in place.
- `capture=False` runs the same padded static batch eagerly: the CPU tests check padding and
  static buffers this way, and it is the fallback shape of the code path.
"""

from __future__ import annotations

import bisect
import logging
import time

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import numpy as np
import torch

from moecluster.kernels.fp8_quant import w8a16_only
from moecluster.kernels.stable_argsort import stable_argsort
from moecluster.router.experts.all_to_all import AllToAllDispatch
from moecluster.router.experts.dispatch import LocalDispatch
from moecluster.router.experts.gather_dispatch import GatherDispatch
from moecluster.workers.engine.scheduler import ScheduledSeq
from moecluster.workers.model.attention_metadata import AttentionMetadata
from moecluster.workers.model.deepseek import DeepseekV3Model
from moecluster.workers.model.moe import MoE

log = logging.getLogger(__name__)

_IDS, _POS, _SLOT, _LEN, _MASK, _PREV = range(6)  # rows of the (6, max batch) int64 input buffer


class PrevTokens(NamedTuple):
    """Input tokens still on the device: the previous step's samples (asynchronous scheduling)."""

    tokens: torch.Tensor  # (m,) int64 on the device: the previous step's sampled tokens
    rows: list[int]  # per scheduled sequence: its input token's row in `tokens`, or -1 (on the host)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The captured batch sizes up to max_batch (>= 1), ascending."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [1, 2, 4, 8, *range(16, 129, 16), *range(160, max_batch + 1, 32)]
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


def graphable(model: DeepseekV3Model) -> bool:
    """Whether decode steps of this model can be captured: every MoE layer dispatches locally or
    through an all-to-all that a `GatherDispatch` can stand in for."""
    return all(isinstance(m.dispatcher, (LocalDispatch, AllToAllDispatch)) for m in model.modules() if isinstance(m, MoE))


class DecodeGraphs:
    def __init__(
        self,
        model: DeepseekV3Model,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_batch: int,
        max_model_len: int,
        scratch_block: int,
        capture: bool = True,
        experts_w8a8: bool = False,
        linears_w8a8: bool = False,
    ) -> None:
        if any(scratch_block >= c.shape[0] for c in kv_caches):
            raise ValueError(f"scratch block {scratch_block} is outside the KV cache ({kv_caches[0].shape[0]} blocks)")
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.sizes = graph_batch_sizes(max_batch)
        self.capture_enabled = capture
        # FP8 modes inside the graphs (the engine passes its decode_experts_w8a8 / decode_linears_w8a8;
        # both False here: W8A16 throughout): routed experts W8A8 at any rows, dense linears from
        # W8A8_DECODE_LINEAR_MIN_ROWS rows
        self.experts_w8a8 = experts_w8a8
        self.linears_w8a8 = linears_w8a8
        device = model.embed_tokens.device
        n, width = self.sizes[-1], -(-max_model_len // block_size)
        self._scratch = scratch_block
        pin = device.type == "cuda"
        self._host = torch.zeros((6, n), dtype=torch.int64, pin_memory=pin)  # ids, positions, slots, lengths, mask, prev
        self._host_tables = torch.full((n, width), scratch_block, dtype=torch.int32, pin_memory=pin)
        self._inputs = torch.zeros((6, n), dtype=torch.int64, device=device)
        self._tables = torch.full((n, width), scratch_block, dtype=torch.int32, device=device)
        self._held: list[list[int] | None] = [None] * n  # the block ids each host table row holds
        # a padding row: token 0 at position 0, slot 0 of the scratch block, context 1, mask 0
        self._padding_column = np.array([0, 0, scratch_block * block_size, 1, 0, -1])[:, None]
        self._rows = torch.arange(n, device=device)
        # the last host -> device copy: the host buffers are in use until it is done
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        # expert-parallel MoE layers: the sync-free dispatcher the graphs run with, per layer
        self._gather = {
            m: GatherDispatch(m.dispatcher.placement, m.dispatcher.rank, m.dispatcher.group, device, stable_argsort)
            for m in model.modules() if isinstance(m, MoE) and isinstance(m.dispatcher, AllToAllDispatch)
        }
        self.fill([], n)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    @property
    def captured(self) -> bool:
        """Whether replays run captured graphs (else the same padded batch runs eagerly)."""
        return bool(self._graphs)

    @property
    def grouped(self) -> bool:
        """Whether replays run collectives with other ranks (then the group picks every step's size)."""
        return bool(self._gather)

    def sync_placement(self) -> None:
        """After EPLB moved experts: the captured dispatchers follow the layers' new placements."""
        for moe, gather in self._gather.items():
            assert isinstance(moe.dispatcher, AllToAllDispatch)
            gather.set_placement(moe.dispatcher.placement)

    def size_for(self, n: int) -> int:
        """The captured size a batch of n sequences runs at (n <= max_batch)."""
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    def can_run(self, scheduled: list[ScheduledSeq]) -> bool:
        """A decode-only batch (every sequence computes one token) that fits the largest size."""
        return 0 < len(scheduled) <= self.max_batch and all(s.num_tokens == 1 for s in scheduled)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every size (no-op unless capture is enabled). Raises if an op of the forward
        cannot be captured (a host sync), naming the setting that turns graphs off."""
        if not self.capture_enabled or self._graphs:
            return
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        warm = torch.cuda.Stream()  # the inputs are all padding since __init__
        try:
            with self._graph_forward():
                for size in reversed(self.sizes):
                    ids, meta = self._batch(size)
                    warm.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(warm):
                        self.model(ids, meta, self.kv_caches)
                    torch.cuda.current_stream().wait_stream(warm)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        out = self.model(ids, meta, self.kv_caches)
                    self._graphs[size], self._outputs[size] = graph, out
        except RuntimeError as e:
            raise RuntimeError(f"CUDA graph capture of a decode step failed ({e}); run eagerly with "
                               "engine cuda_graph_max_batch: 0") from e
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
                 len(self.sizes), self.sizes, time.perf_counter() - t0)

    @torch.no_grad()
    def run(self, scheduled: list[ScheduledSeq], size: int | None = None, prev: PrevTokens | None = None) -> torch.Tensor:
        """The final hidden states (n, hidden) of a decode-only batch, row i = scheduled[i], run at
        `size` (a captured size >= n; default the smallest); prev: input tokens on the device."""
        n = len(scheduled)
        size = self.size_for(n) if size is None else size
        if size not in self.sizes or n > size:
            raise ValueError(f"a batch of {n} cannot run at size {size} (captured sizes {self.sizes})")
        self.fill(scheduled, size, prev)
        graph = self._graphs.get(size)
        if graph is None:  # capture disabled (or CPU): the same padded batch, eagerly
            ids, meta = self._batch(size)
            with self._graph_forward():
                return self.model(ids, meta, self.kv_caches)[:n]
        graph.replay()
        return self._outputs[size][:n]

    @contextmanager
    def _graph_forward(self) -> Iterator[None]:
        """The graphs' forward (warm-up, capture, and the eager stand-in without capture):
        expert-parallel layers dispatch through their GatherDispatch inside, and FP8 weights run
        W8A16, routed experts W8A8 with `experts_w8a8`, dense linears with `linears_w8a8`
        (`w8a16_only`: warm-up and capture must launch the same kernels)."""
        eager = {moe: moe.dispatcher for moe in self._gather}
        for moe, gather in self._gather.items():
            moe.dispatcher = gather
        try:
            with w8a16_only(experts_w8a8=self.experts_w8a8, linears_w8a8=self.linears_w8a8):
                yield
        finally:
            for moe, dispatcher in eager.items():
                moe.dispatcher = dispatcher

    def fill(self, scheduled: list[ScheduledSeq], size: int, prev: PrevTokens | None = None) -> None:
        """Write the batch (padded to `size`) into the host buffers and copy them to the device
        (the host's share of a replay; `run` calls it, `bench engine` times it).

        Without asynchronous scheduling host time here is GPU idle time (the step waits for it),
        and with it, it is host time every step still spends; so the per-row work is list
        comprehensions into whole buffer rows, and a block-table row is rewritten only when it
        differs from what the row holds (a sequence gains a block once per block_size steps;
        the comparison of two int lists is far cheaper than converting one to numpy)."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has read the host buffers (no-op before the first)
        host, tables, held = self._host.numpy(), self._host_tables.numpy(), self._held
        bs, n = self.block_size, len(scheduled)
        seqs = [s.seq for s in scheduled]
        pos = [q.num_computed for q in seqs]
        host[_IDS, :n] = [q.token_ids[p] for q, p in zip(seqs, pos)]  # a token still on the device: -1 for now
        host[_PREV, :n] = prev.rows if prev is not None else -1
        host[_POS, :n] = pos
        host[_SLOT, :n] = [q.table.block_ids[p // bs] * bs + p % bs for q, p in zip(seqs, pos)]  # cache_slots, inline
        host[_LEN, :n] = host[_POS, :n] + 1
        host[_MASK, :n] = 1
        for i, q in enumerate(seqs):
            blocks = q.table.block_ids
            if held[i] != blocks:
                tables[i, : len(blocks)] = blocks
                held[i] = list(blocks)
        host[:, n:size] = self._padding_column
        tables[n:size, 0] = self._scratch
        held[n:size] = [None] * (size - n)  # padding rows: their next sequences write whole tables
        self._inputs.copy_(self._host, non_blocking=True)
        self._tables[:size].copy_(self._host_tables[:size], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if prev is not None:  # those tokens, from the previous step's samples, on the device
            ids, rows = self._inputs[_IDS, :size], self._inputs[_PREV, :size]
            ids.copy_(torch.where(rows >= 0, prev.tokens[rows.clamp(min=0)], ids))

    def _batch(self, size: int) -> tuple[torch.Tensor, AttentionMetadata]:
        """The static inputs of a `size`-row decode batch (views of the device buffers)."""
        rows = self._rows[:size]
        meta = AttentionMetadata(
            positions=self._inputs[_POS, :size],
            slot_mapping=self._inputs[_SLOT, :size],
            block_tables=self._tables[:size],
            seq_lens=self._inputs[_LEN, :size],
            query_lens=(1,) * size,
            query_starts=tuple(range(size)),
            decode_seqs=rows,
            decode_rows=rows,
            prefill_seqs=(),
            token_mask=self._inputs[_MASK, :size],
        )
        return self._inputs[_IDS, :size], meta
