"""MLA decode attention in absorbed form over the paged latent cache.

Each query head attends over a sequence's latent cache entries (kv_lora_rank compressed values
plus the shared rope key, per token), reading them through the sequence's block table. The
output stays in latent space (kv_lora_rank per head); the caller applies W_UV.

This module holds the torch reference (also the CPU path) and a Triton implementation in two
kernels with a thin launcher, `mla_decode`.

Algorithm (flash-decoding over a paged cache, all heads of a sequence per latent tile)
--------------------------------------------------------------------------------------
In absorbed MLA every head of a sequence attends over the *same* per-token cache row: 576
values for DeepSeek-V3 / Kimi K2 (512 latent values, which are both K-nope and V, plus a 64-wide
rope key). One decode step is therefore, per sequence, a tiny "prefill-shaped" problem: heads
play the role of query rows. Loading a row once and reusing it for every head is what makes the
kernel efficient, so:

* Stage 1 (`_mla_decode_stage1`): a program owns BLOCK_H heads of one sequence and one unit of
  its context. It keeps the heads' queries (BLOCK_H, 576) on chip, walks its unit in tiles of
  BLOCK_N tokens (rows found through the block table), loads each tile once and uses it for both
  products on the tensor cores:
  scores = q_nope . latent^T + q_pe . rope^T (M = heads, K = 512 + 64) and acc += p . latent
  (M = heads, N = 512). Softmax is the online (running max / running sum) form in fp32 with
  exp2, scale*log2(e) folded into one multiply. Heads beyond the real count (toy models with 4
  heads, or 20 heads with BLOCK_H = 32) are padded with zero queries and masked at the store:
  tl.dot needs M >= 16.
* Tiles: the unit's whole tiles run unmasked; the sequence's last, partial tile (if any) runs
  once after the loop with a token mask (rows past the length are never read, as their slots
  may hold anything). When a tile lies inside one page (block_size % BLOCK_N == 0, the
  production case: pages of 64, BLOCK_N = 64) the block table is read once per tile, one tile
  ahead (a scalar carried through the loop), and the rows are contiguous, so on sm_90+ one
  thread also bulk-prefetches the *next* tile into L2 (`cp.async.bulk.prefetch.L2`, inline PTX)
  at the top of each iteration; otherwise a tile may straddle pages of any size and each row's
  page is looked up.
* Split-K: one program per sequence is far too few for a GPU at decode batch sizes, and a batch
  mixes short and long sequences, so each sequence is cut into *units* of at most the same
  number of tiles for the whole batch (`mla_schedule.py`: a small kernel chooses the size from
  the lengths on the GPU and lists the units longest first; no host sync). A sequence of one
  unit gets its output from stage 1 directly; the units of a longer one each write a normalized
  partial output (fp32) and its log2-sum-exp.
* Stage 2 (`_mla_decode_stage2`): one program per (sequence, 16 heads) merges a sequence's units'
  partial outputs, each weighted by exp2(its lse - the running max), into the output, in q's
  dtype; sequences of one unit are left as stage 1 wrote them.

Grid and tiles
--------------
Stage 1's grid is (head blocks, units the grid can hold), head block fastest: the programs that
read the same tiles (same unit, other heads) are adjacent in launch order, so with 128
heads in two blocks of 64 the second block's reads mostly hit L2. The (BLOCK_H, 512) fp32
accumulator is the register budget: BLOCK_H = 64 with 8 warps holds 128 fp32 values per thread
for it (each of the two warpgroups owns 256 of the 512 output columns, as in FlashMLA).
Splitting the 512 output columns across programs would shrink it but repeat the QK^T work and
the cache reads for every column chunk (each needs the full 576-wide scores), so the columns
stay whole. Shared memory holds q (BLOCK_H * 576 * 2 B = 72 KiB) plus one (BLOCK_N, 576) tile
per pipeline stage (72 KiB at BLOCK_N = 64).

Defaults (Hopper, 576-wide bf16 rows): BLOCK_H = 64 (the padded head count if smaller, at least
16), BLOCK_N = 64 (one production page), 8 warps (4 below BLOCK_H = 64), 2 stages, the next
tile's L2 prefetch on: 216 KiB of shared memory, 255 registers (none spilled), wgmma for all
three products and 16-byte cp.async loads (Triton 3.6, H100). Where shared memory is smaller,
BLOCK_N and the stages step down (`_fit_tiles`). Measured on an H100 with `moecluster bench
kernels --only mla` (do_bench medians of whole launcher calls, bf16, pages of 64, shuffled
tables, splits chosen by the launcher as it then did; copy 3021 GB/s), batch 64 / 128 x context
4096 / 32768 (numbers of that session; session 19's are in docs/performance.md):

| heads | batch | context | ms    | GB/s | of copy | before: ms | of copy |
|-------|-------|---------|-------|------|---------|------------|---------|
| 128   | 64    | 4096    | 0.252 | 1267 | 42%     | 0.416      | 25%     |
| 128   | 64    | 32768   | 1.909 | 1275 | 42%     | 2.767      | 29%     |
| 128   | 128   | 4096    | 0.483 | 1324 | 44%     | 0.813      | 26%     |
| 128   | 128   | 32768   | 3.855 | 1263 | 42%     | 5.482      | 29%     |
| 64    | 64    | 4096    | 0.146 | 2127 | 70%     | 0.343      | 30%     |
| 64    | 64    | 32768   | 0.933 | 2600 | 86%     | 1.571      | 51%     |
| 64    | 128   | 4096    | 0.265 | 2346 | 78%     | 0.436      | 47%     |
| 64    | 128   | 32768   | 2.088 | 2323 | 77%     | 2.947      | 55%     |

"Before" is the previous version in the same session: a per-row, masked block-table gather
inside the loop (a synchronous load in front of every tile's copies), no L2 prefetch, and a
`seq_lens.max()` host sync in the launcher, which alone cost 0.07-0.27 ms a call here. Gains
measured separately (same session, no host sync on either side): the unmasked whole-tile loop
with the page carried a tile ahead 1.19-1.31x, the L2 prefetch of the next tile another
1.03-1.10x (prefetching 2 or 3 tiles ahead was worse at 64 heads, mixed at 128). The ">= 80%
of copy" target is met at 64 heads x 64 x 32768 only; at 128 heads the work sits near the
H100's balance point (about 240 FLOP per cache byte) and the kernel reaches about 300 TFLOP/s
of useful work.

What limits it (read from the TTGIR, Triton 3.6): with 2 stages the pipeliner issues tile i+1's
copies after tile i's P.V and waits for them at the top of the next iteration, so the copies
overlap only the P.V, not the QK^T and softmax (the L2 prefetch shortens, not hides, them); and
because QK^T feeds another dot, both warpgroups compute the whole (64, BLOCK_N) score tile
(warps [8, 1] over M = 64), doubling the QK^T tensor work. A third stage does not fit next to q
(72 KiB + 3 x 72 KiB). FlashMLA-style producer / consumer warpgroups (Gluon or CUDA) are the way
past this. Tried and not kept (H100, the eight bench shapes, against the loop without the L2
prefetch): TMA tensor descriptors for the whole tiles (latent and rope boxes, BLOCK_N 64, 2
stages: 3-18% slower in six shapes, level in two); BLOCK_N 32 with 3 or 4 stages, which keeps
2-3 tiles in flight (TMA or cp.async: 11-45% slower; with a 2-tile-ahead L2 prefetch 17-38%);
BLOCK_N 16 with 8 stages (1.6-2.2x slower); the rope product before the latent one (no gain, up
to 7% slower); the next tile loaded into registers during the current one (num_stages 1: 400-950
bytes of spills, not run). Earlier: BLOCK_H 16/32, BLOCK_N 128, 4 warps, 1 or 3 stages were
14-80% slower at 128 heads x 32 x 4096. All knobs are launcher arguments, for autotuning.

Units (`mla_schedule.py`). Before session 19 every sequence was cut into the same number of
splits, chosen on the host from the block tables' capacity by a wave model. That is right when
every sequence is as long as the longest, and slow when they differ: at lengths drawn from
1..32768 a launch lasted as long as its longest sequence while most SMs idled (128 heads x 64:
48% of copy against FlashMLA's 70% on the same H100). The unit plan is chosen on the GPU from the
lengths (so CUDA graphs replay each step's own plan) and the units run longest first. With the
Gluon kernel's TMA store of the output (`mla_seesaw.py`; since session 20 at any table width), at mixed lengths it is
5-26% faster than the splits were (from 10% faster to 6% slower than FlashMLA), and at equal
lengths 3% faster to 3% slower than the splits: the plan kernel and stage 2 are two more launches a call
(docs/performance.md, session 19). The engine makes one plan a step for all layers (`plans`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import torch

from moecluster.kernels import mla_schedule, mla_seesaw
from moecluster.kernels.device import cuda_capability, cuda_sm_count

try:  # the CPU path needs only torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency wherever the kernels run
    triton = None
    tl = None


def mla_decode_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """q (batch, heads, kv_lora_rank + rope_dim) over kv_cache (blocks, block_size, kv_lora_rank + rope_dim)
    with block_tables (batch, max_blocks) and seq_lens (batch,) -> (batch, heads, kv_lora_rank)."""
    batch, _, dim = q.shape
    if kv_cache.shape[-1] != dim:
        raise ValueError(f"q has {dim} values per head but the cache holds {kv_cache.shape[-1]} per token")
    if batch == 0:
        return q.new_empty((0, q.shape[1], kv_lora_rank))
    block_size = kv_cache.shape[1]
    max_len = int(seq_lens.max())
    n_blocks = -(-max_len // block_size)
    kv = kv_cache[block_tables[:, :n_blocks].long()]  # (batch, n_blocks, block_size, dim)
    kv = kv.reshape(batch, n_blocks * block_size, dim)[:, :max_len].to(q.dtype)  # (batch, max_len, dim)
    scores = torch.einsum("bhd,bld->bhl", q, kv).float() * scale  # (batch, heads, max_len)
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None].to(q.device)  # (batch, max_len)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(seq_lens.to(q.device)[:, None, None] > 0, probs, 0.0).to(q.dtype)  # length 0: zeros
    return torch.einsum("bhl,blc->bhc", probs, kv[..., :kv_lora_rank])  # (batch, heads, kv_lora_rank)


# --------------------------------------------------------------------------------------------
# Triton kernels. They are plain functions here and go through `triton.jit` on first launch
# (`_jitted`): triton.jit decides at decoration time between the compiler and the CPU
# interpreter (TRITON_INTERPRET=1), and this module is often imported, for the reference,
# before a test session sets that variable.
# --------------------------------------------------------------------------------------------


def _mla_decode_stage1(
    Q,  # (batch, heads, kv_lora_rank + rope_dim)
    KV,  # (num_blocks, block_size, kv_lora_rank + rope_dim)
    BlockTables,  # (batch, max_blocks) int32 / int64
    Out,  # (batch, heads, kv_lora_rank): written here for a sequence of one unit
    Partial,  # (capacity, heads, kv_lora_rank) fp32: a unit's normalized partial, sequences of several units
    Lse,  # (capacity, heads) fp32: a unit's log2-sum-exp, same
    Units,  # (capacity, 4) int32: (sequence, first token, end token, partial slot), from mla_schedule
    SeqPlan,  # (batch, 2) int32: (first unit, unit count)
    NumUnits,  # (1,) int32
    sm_scale_log2,  # scale * log2(e)
    num_heads,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kvb,
    stride_kvt,
    stride_kvd,
    stride_btb,
    stride_btn,
    stride_outb,
    stride_outh,
    stride_outd,
    stride_pu,
    stride_ph,
    stride_pd,
    stride_lu,
    stride_lh,
    KV_LORA: tl.constexpr,  # latent width (512): K-nope and V
    ROPE: tl.constexpr,  # rope key width (64)
    BLOCK_C: tl.constexpr,  # KV_LORA padded to a power of two
    BLOCK_R: tl.constexpr,  # ROPE padded to a power of two, at least 16
    PAGE_SIZE: tl.constexpr,  # cache block size (tokens per page)
    BLOCK_H: tl.constexpr,  # heads per program (dot M)
    BLOCK_N: tl.constexpr,  # tokens per tile
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), ignored for 16-bit inputs
    TILE_IN_PAGE: tl.constexpr,  # PAGE_SIZE % BLOCK_N == 0: a whole tile is rows of one page
    PREFETCH_L2: tl.constexpr,  # TILE_IN_PAGE on sm_90+: bulk-prefetch the next tile into L2 (PTX)
    PREFETCH_BYTES: tl.constexpr,  # BLOCK_N rows of the cache, in bytes (a multiple of 16)
):
    pid_h = tl.program_id(0)  # fastest: programs of one unit (other heads) are adjacent
    u = tl.program_id(1)
    n_units = tl.load(NumUnits)
    if u >= n_units:  # the grid holds `capacity` units; the plan used fewer
        return
    b = tl.load(Units + u * 4).to(tl.int64)
    start = tl.load(Units + u * 4 + 1)
    end = tl.load(Units + u * 4 + 2)  # may be start: an empty sequence
    slot = tl.load(Units + u * 4 + 3).to(tl.int64)  # its partial's row
    direct = tl.load(SeqPlan + b * 2 + 1) == 1  # the sequence's only unit
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N  # whole tiles end here

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    offs_c = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    offs_r = tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    offs_t = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask_h = offs_h < num_heads
    # Padding masks on the feature dims; when there is no padding they are constant true, so the
    # compiler sees the loads as whole rows and keeps them 16 bytes wide.
    if BLOCK_C == KV_LORA:
        mask_c = tl.full((BLOCK_C,), 1, tl.int1)
    else:
        mask_c = offs_c < KV_LORA
    if BLOCK_R == ROPE:
        mask_r = tl.full((BLOCK_R,), 1, tl.int1)
    else:
        mask_r = offs_r < ROPE

    q_row = Q + b * stride_qb + offs_h[:, None] * stride_qh  # (BLOCK_H, 1)
    q_nope = tl.load(q_row + offs_c[None, :] * stride_qd, mask=mask_h[:, None] & mask_c[None, :], other=0.0)
    q_pe = tl.load(q_row + (KV_LORA + offs_r)[None, :] * stride_qd, mask=mask_h[:, None] & mask_r[None, :], other=0.0)
    # q_nope (BLOCK_H, BLOCK_C), q_pe (BLOCK_H, BLOCK_R): loaded once, reused for every tile

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)  # running max of log2-scaled scores
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    bt_row = BlockTables + b * stride_btb

    # Whole tiles: no token mask.
    if TILE_IN_PAGE:
        # Pages carried through the loop, loaded a tile ahead of use: next_page for this tile's
        # copies, pf_page for the next tile's L2 prefetch. (One carried pair of (this, next) page
        # instead, loaded two tiles ahead, stops the pipeliner from making the copies async.)
        has_tiles = start < full_end
        last = tl.maximum(full_end - 1, 0)
        next_page = tl.load(bt_row + (start // PAGE_SIZE) * stride_btn, mask=has_tiles, other=0)
        if PREFETCH_L2:
            pf_page = tl.load(bt_row + (tl.minimum(start + BLOCK_N, last) // PAGE_SIZE) * stride_btn, mask=has_tiles, other=0)
    for n0 in range(start, full_end, BLOCK_N):
        if TILE_IN_PAGE:
            if PREFETCH_L2:
                # Warm L2 with the next tile (contiguous rows of one page) now, so that its copies,
                # which the pipeliner issues only after this tile's P.V, hit L2 instead of HBM.
                # One thread issues `cp.async.bulk.prefetch.L2` of $2 bytes at $1 when $3 != 0.
                n1 = n0 + BLOCK_N
                next_tile = KV + pf_page.to(tl.int64) * stride_kvb + (n1 % PAGE_SIZE) * stride_kvt
                tl.inline_asm_elementwise(
                    "{ .reg .pred %pp, %pq; .reg .u32 %tt; mov.u32 %tt, %tid.x; setp.eq.u32 %pp, %tt, 0; "
                    "setp.ne.u32 %pq, $3, 0; and.pred %pp, %pp, %pq; "
                    "@%pp cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                    "=r,l,r,r",
                    [next_tile.to(tl.int64, bitcast=True), PREFETCH_BYTES + 0 * n1, (n1 < full_end).to(tl.int32)],
                    dtype=tl.int32, is_pure=False, pack=1,
                )  # fmt: skip
                pf_page = tl.load(bt_row + (tl.minimum(n1 + BLOCK_N, full_end - 1) // PAGE_SIZE) * stride_btn)
            page = next_page  # one page for the whole tile
            next_page = tl.load(bt_row + (tl.minimum(n0 + BLOCK_N, full_end - 1) // PAGE_SIZE) * stride_btn)
            row = KV + page.to(tl.int64) * stride_kvb + (n0 % PAGE_SIZE + offs_t) * stride_kvt  # (BLOCK_N,)
        else:  # a tile over several pages: a page per row
            offs_n = n0 + offs_t
            page = tl.load(bt_row + (offs_n // PAGE_SIZE) * stride_btn)
            row = KV + page.to(tl.int64) * stride_kvb + (offs_n % PAGE_SIZE) * stride_kvt  # (BLOCK_N,)
        latent = tl.load(row[:, None] + offs_c[None, :] * stride_kvd, mask=mask_c[None, :], other=0.0)
        latent = latent.to(q_nope.dtype)  # (BLOCK_N, BLOCK_C): K-nope and V
        k_pe = tl.load(row[:, None] + (KV_LORA + offs_r)[None, :] * stride_kvd, mask=mask_r[None, :], other=0.0)
        k_pe = k_pe.to(q_nope.dtype)  # (BLOCK_N, BLOCK_R)

        s = tl.dot(q_nope, tl.trans(latent), input_precision=DOT_PRECISION)  # (BLOCK_H, BLOCK_N) fp32
        s = tl.dot(q_pe, tl.trans(k_pe), acc=s, input_precision=DOT_PRECISION)
        s = s * sm_scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_H, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(latent.dtype), latent, acc=acc, input_precision=DOT_PRECISION)  # (BLOCK_H, BLOCK_C)
        m_i = m_new

    # The last, partial tile of the sequence (only in its last unit): rows past the
    # length are masked at the load (zeros, never the slot's contents) and in the scores.
    if full_end < end:
        offs_n = full_end + offs_t  # (BLOCK_N,) token positions
        mask_n = offs_n < end
        page = tl.load(bt_row + (offs_n // PAGE_SIZE) * stride_btn, mask=mask_n, other=0)
        row = KV + page.to(tl.int64) * stride_kvb + (offs_n % PAGE_SIZE) * stride_kvt  # (BLOCK_N,)
        latent = tl.load(
            row[:, None] + offs_c[None, :] * stride_kvd, mask=mask_n[:, None] & mask_c[None, :], other=0.0
        ).to(q_nope.dtype)
        k_pe = tl.load(
            row[:, None] + (KV_LORA + offs_r)[None, :] * stride_kvd, mask=mask_n[:, None] & mask_r[None, :], other=0.0
        ).to(q_nope.dtype)

        s = tl.dot(q_nope, tl.trans(latent), input_precision=DOT_PRECISION)
        s = tl.dot(q_pe, tl.trans(k_pe), acc=s, input_precision=DOT_PRECISION)
        s = tl.where(mask_n[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the tile holds at least one valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(latent.dtype), latent, acc=acc, input_precision=DOT_PRECISION)
        m_i = m_new

    nonempty = l_i > 0.0  # false only for an empty sequence
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]  # (BLOCK_H, BLOCK_C), zeros for an empty sequence
    # which rows go where, as vectors (the interpreter mis-types a vector mask & a scalar condition)
    where = tl.zeros((BLOCK_H,), tl.int32) + direct.to(tl.int32)  # 1: the output, 0: a partial
    to_out, to_partial = mask_h & (where == 1), mask_h & (where == 0)
    o_ptrs = Out + b * stride_outb + offs_h[:, None] * stride_outh + offs_c[None, :] * stride_outd
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=to_out[:, None] & mask_c[None, :])
    p_ptrs = Partial + slot * stride_pu + offs_h[:, None] * stride_ph + offs_c[None, :] * stride_pd
    tl.store(p_ptrs, out, mask=to_partial[:, None] & mask_c[None, :])
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))  # (BLOCK_H,)
    tl.store(Lse + slot * stride_lu + offs_h * stride_lh, lse, mask=to_partial)


def _mla_decode_stage2(
    Partial,  # (capacity, heads, kv_lora_rank) fp32
    Lse,  # (capacity, heads) fp32
    SeqPlan,  # (batch, 2) int32: (first unit, unit count)
    Out,  # (batch, heads, kv_lora_rank)
    num_heads,
    stride_pu,
    stride_ph,
    stride_pd,
    stride_lu,
    stride_lh,
    stride_outb,
    stride_outh,
    stride_outd,
    KV_LORA: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HEADS2: tl.constexpr,  # heads per program
):
    b = tl.program_id(0).to(tl.int64)
    first = tl.load(SeqPlan + b * 2).to(tl.int64)
    count = tl.load(SeqPlan + b * 2 + 1)
    offs_h = tl.program_id(1) * HEADS2 + tl.arange(0, HEADS2)
    offs_c = tl.arange(0, BLOCK_C)
    # a sequence of one unit was written by stage 1 (the test is a vector: see stage 1's stores)
    mask_h = (offs_h < num_heads) & (offs_h * 0 + count > 1)
    mask = mask_h[:, None] & (offs_c < KV_LORA)[None, :]
    lse_base = Lse + first * stride_lu + offs_h * stride_lh  # (HEADS2,)
    p_base = Partial + first * stride_pu + offs_h[:, None] * stride_ph + offs_c[None, :] * stride_pd

    # Online merge, seeded with the first unit, which is never empty (a sequence of several units
    # has a token in each): m stays finite.
    m = tl.load(lse_base, mask=mask_h, other=0.0)
    denom = tl.full((HEADS2,), 1.0, tl.float32)
    acc = tl.load(p_base, mask=mask, other=0.0)  # (HEADS2, BLOCK_C) fp32
    for s in range(1, count):
        lse = tl.load(lse_base + s * stride_lu, mask=mask_h, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha[:, None] + w[:, None] * tl.load(p_base + s * stride_pu, mask=mask, other=0.0)
        denom = denom * alpha + w
        m = m_new
    out = acc / denom[:, None]
    o_ptrs = Out + b * stride_outb + offs_h[:, None] * stride_outh + offs_c[None, :] * stride_outd
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)


@functools.cache
def _jitted(interpret: bool):
    """The two kernels through triton.jit; keyed on the interpreter flag, which triton.jit reads."""
    del interpret  # part of the cache key only
    # Arguments that change from step to step (block-table width, the batch's stride) stay
    # unspecialized: Triton would otherwise compile a new variant
    # whenever one of them becomes 1 or a multiple of 16, a stall of seconds while serving.
    return (
        triton.jit(_mla_decode_stage1, do_not_specialize=["stride_btb", "stride_outb"]),
        triton.jit(_mla_decode_stage2, do_not_specialize=["stride_outb"]),
    )


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MAX_GRID_Y = 65535  # stage 1's units are its grid's second dimension
_INTERPRETER_SMS = 4  # a stand-in SM count for the CPU interpreter: few programs, fast tests
_DEFAULT_BLOCK_N = 64
_DEFAULT_BLOCK_H = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_sm_count(device)
    return _INTERPRETER_SMS


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _smem_budget(device: torch.device) -> int:
    """Shared memory one program may take (227 KiB on Hopper); unbounded in the interpreter."""
    if device.type != "cuda":
        return 1 << 30
    return _cuda_smem_budget(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_smem_budget(index: int) -> int:
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 227 * 1024)


def _fit_tiles(
    block_h: int, block_n: int | None, num_stages: int | None, row_bytes: int, budget: int
) -> tuple[int, int]:
    """Default BLOCK_N and pipeline depth (those not given): the first of (64, 2), (32, 2),
    (64, 1), (32, 1), (16, 1) whose shared memory, q plus `num_stages` tiles, fits `budget`.
    On Hopper with 576-wide bf16 rows and BLOCK_H = 64 that is (64, 2): 216 KiB of 227."""
    candidates = [(_DEFAULT_BLOCK_N, 2), (32, 2), (_DEFAULT_BLOCK_N, 1), (32, 1), (16, 1)]
    candidates = [(block_n or n, num_stages or st) for n, st in candidates]
    for n, st in candidates:
        if (block_h + st * n) * row_bytes <= budget:
            return n, st
    return candidates[0]  # nothing fits: let the compiler report it


def _programs_per_sm(block_h: int, block_n: int, num_warps: int, num_stages: int, row_bytes: int) -> int:
    """A rough count of stage-1 programs resident per SM on Hopper: shared memory holds q and
    `num_stages` tiles (228 KiB an SM); registers (64 K an SM) run near 255 a thread, so 8 warps
    fill an SM and 4 warps fit twice."""
    smem = (block_h + num_stages * block_n) * row_bytes
    return max(1, min(228 * 1024 // smem, 2 if num_warps <= 4 else 1))


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    num_splits: int | None = None,
    block_n: int | None = None,
    block_h: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    *,
    out: torch.Tensor | None = None,
    plans: dict[tuple, tuple] | None = None,
) -> torch.Tensor:
    """MLA decode attention, absorbed form: q (batch, heads, kv_lora_rank + rope_dim) over the paged
    kv_cache (num_blocks, block_size, kv_lora_rank + rope_dim) through block_tables (batch,
    max_blocks) with seq_lens (batch,) -> (batch, heads, kv_lora_rank) in q's dtype (zeros for a
    sequence of length 0).

    Runs the Triton kernels when the tensors are on CUDA or TRITON_INTERPRET=1 is set, else
    `mla_decode_reference`. On sm_90, for the production shapes (`mla_seesaw.supported`) and no
    pinned tiles, stage 1 is the Gluon kernel in `mla_seesaw.py` instead (same partials, same
    stage 2). Tuning knobs (None: the defaults in the module docstring):
    num_splits (cut the longest sequence into units of ceil(its tiles / num_splits) tiles, which
    may be fewer than num_splits units: 4 tiles and 3 give 2 units of 2; None: chosen on the GPU
    from the lengths, `mla_schedule`), block_n (tokens per tile, a power of two >= 16), block_h (heads per
    program, a power of two >= 16), num_warps, num_stages. Nothing is read back to the host.
    out: an optional (batch, heads, kv_lora_rank) tensor of q's dtype to write into.
    plans: an optional dict, one per step (and one per CUDA graph captured), that keeps the work
    plan: a later call with the same seq_lens tensor (the same object, not modified in place by a
    torch op since: writes through `.data`, numpy or DLPack views are not seen), launch shape and
    capture state reuses it, so a model's layers plan once a step.
    Memory: the fp32 partials take (batch + a wave of programs) x heads x kv_lora_rank x 4 bytes
    (about 150 MB at 512 sequences x 128 heads), whether or not a sequence is cut: for the call, or
    kept with the plan for the step when `plans` is given.
    Block tables must cover every sequence's length; this is not checked (it would need a sync).
    """
    _check_inputs(q, kv_cache, block_tables, seq_lens, kv_lora_rank, out)
    for name, value in (("num_splits", num_splits), ("num_warps", num_warps), ("num_stages", num_stages)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value in (("block_n", block_n), ("block_h", block_h)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")

    knobs = any(v is not None for v in (block_n, block_h, num_warps, num_stages))  # pinned Triton tiles
    batch, num_heads, dim = q.shape
    if out is None:
        out = q.new_empty((batch, num_heads, kv_lora_rank))
    if batch == 0 or num_heads == 0:
        return out
    interpreting = _interpreting()
    if not (q.is_cuda or interpreting):
        out.copy_(mla_decode_reference(q, kv_cache, block_tables, seq_lens, scale, kv_lora_rank))
        return out

    rope_dim = dim - kv_lora_rank
    page_size = kv_cache.shape[1]
    row_bytes = dim * max(q.element_size(), kv_cache.element_size())  # one staged row of q or of the cache
    block_h = block_h or min(_DEFAULT_BLOCK_H, max(16, _next_pow2(num_heads)))
    block_n, num_stages = _fit_tiles(block_h, block_n, num_stages, row_bytes, _smem_budget(q.device))
    num_warps = num_warps or (8 if block_h >= 64 else 4)
    resident = _sm_count(q.device) * _programs_per_sm(block_h, block_n, num_warps, num_stages, row_bytes)
    head_blocks = -(-num_heads // block_h)
    # the grid's units per head block: one a sequence, and another wave's worth to cut long ones
    capacity = mla_schedule.capacity(batch, head_blocks, resident, num_splits or 0)
    if capacity > _MAX_GRID_Y:
        raise ValueError(f"{batch} sequences x {num_splits or 1} units make {capacity} units a head block, more than "
                         f"a launch grid holds ({_MAX_GRID_Y}); use fewer splits or smaller batches")
    # A plan made outside a CUDA graph capture is not reused inside one (nor the reverse): the graph
    # must record its own plan kernel, whose buffer then belongs to the graph's memory pool. Inference
    # tensors keep no version counter, so their plans are not kept. The partials' buffers are kept
    # with the plan: the layers run one after another on one stream, so each reuses them.
    key = None
    if plans is not None and not seq_lens.is_inference():
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        key = (head_blocks, resident, capacity, block_n, num_splits or 0, num_heads, kv_lora_rank, capturing,
               seq_lens._version)
    kept = plans.get(key) if key is not None else None
    if kept is not None and kept[0] is seq_lens:
        plan, partial, lse = kept[1]
    else:
        plan, partial, lse = stage1_work(seq_lens, num_heads, kv_lora_rank, head_blocks, resident, capacity, block_n,
                                         num_splits or 0, interpreting)
        if key is not None:  # the lengths tensor is kept too: its id is not reused while it lives
            plans[key] = (seq_lens, (plan, partial, lse))

    seesaw = (not interpreting and not knobs and block_n == mla_seesaw.TILE
              and mla_seesaw.supported(q, kv_cache, kv_lora_rank))
    stage1, stage2 = _jitted(interpreting)
    block_c, block_r = _next_pow2(kv_lora_rank), max(16, _next_pow2(rope_dim))
    tile_in_page = page_size % block_n == 0
    consts = dict(
        KV_LORA=kv_lora_rank,
        ROPE=rope_dim,
        BLOCK_C=block_c,
        BLOCK_R=block_r,
        PAGE_SIZE=page_size,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        TILE_IN_PAGE=tile_in_page,
        PREFETCH_L2=tile_in_page and not interpreting and _can_prefetch_l2(kv_cache),
        PREFETCH_BYTES=block_n * kv_cache.stride(1) * kv_cache.element_size(),
    )
    scale_log2 = scale * math.log2(math.e)  # both stage-1 kernels use exp2
    if seesaw:
        seesaw = mla_seesaw.try_launch_stage1(q, kv_cache, block_tables, out, partial, lse, plan, capacity, scale_log2)
    if not seesaw:
        stage1[(head_blocks, capacity)](
            q, kv_cache, block_tables, out, partial, lse, *plan,
            scale_log2, num_heads,
            *q.stride(), *kv_cache.stride(), *block_tables.stride(), *out.stride(), *partial.stride(), *lse.stride(),
            **consts, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    heads2 = min(16, _next_pow2(num_heads))
    stage2[(batch, -(-num_heads // heads2))](
        partial, lse, plan[1], out, num_heads, *partial.stride(), *lse.stride(), *out.stride(),
        KV_LORA=kv_lora_rank, BLOCK_C=consts["BLOCK_C"], HEADS2=heads2, num_warps=4,
    )  # fmt: skip
    return out


def stage1_work(
    seq_lens: torch.Tensor, num_heads: int, kv_lora_rank: int, head_blocks: int, resident: int, capacity: int,
    block_n: int, fixed_splits: int, interpreting: bool,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    """What stage 1 works from and into, besides q and the cache: the work plan (`mla_schedule.launch_plan`),
    the fp32 partials (capacity, heads, kv_lora_rank) and their log2-sum-exps (capacity, heads), one
    contiguous tensor each (the Gluon kernel's contract)."""
    plan = mla_schedule.launch_plan(seq_lens, head_blocks, resident, capacity, block_n, fixed_splits, interpreting)
    partial = torch.empty((capacity, num_heads, kv_lora_rank), device=seq_lens.device, dtype=torch.float32)
    lse = torch.empty((capacity, num_heads), device=seq_lens.device, dtype=torch.float32)
    return plan, partial, lse


def _can_prefetch_l2(kv_cache: torch.Tensor) -> bool:
    """Whether stage 1, compiled (the interpreter runs no PTX) with tiles inside a page, may
    bulk-prefetch its next tile into L2: sm_90 or newer, rows packed (a tile is one contiguous
    span) and every tile's first row and byte count 16-byte aligned, as cp.async.bulk.prefetch
    requires."""
    if not kv_cache.is_cuda:
        return False
    if kv_cache.stride(2) != 1 or kv_cache.stride(1) != kv_cache.shape[2]:
        return False
    if cuda_capability(kv_cache.device) < (9, 0):
        return False
    elt = kv_cache.element_size()
    return kv_cache.data_ptr() % 16 == 0 and all((st * elt) % 16 == 0 for st in kv_cache.stride()[:2])


def _check_inputs(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_lora_rank: int,
    out: torch.Tensor | None,
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, heads, kv_lora_rank + rope_dim), got shape {tuple(q.shape)}")
    if kv_cache.dim() != 3:
        raise ValueError(f"kv_cache must be (num_blocks, block_size, dim), got shape {tuple(kv_cache.shape)}")
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be (batch, max_blocks), got shape {tuple(block_tables.shape)}")
    if seq_lens.dim() != 1:
        raise ValueError(f"seq_lens must be (batch,), got shape {tuple(seq_lens.shape)}")
    batch, num_heads, dim = q.shape
    if kv_cache.shape[2] != dim:
        raise ValueError(f"q has {dim} values per head but the cache holds {kv_cache.shape[2]} per token")
    if not 0 < kv_lora_rank <= dim:
        raise ValueError(f"kv_lora_rank must be in 1..{dim}, got {kv_lora_rank}")
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(
            f"batch mismatch: q {batch}, block_tables {block_tables.shape[0]}, seq_lens {seq_lens.shape[0]}"
        )
    if q.dtype not in _DTYPES or kv_cache.dtype not in _DTYPES:
        raise ValueError(f"q and kv_cache must be float16, bfloat16 or float32, got {q.dtype} and {kv_cache.dtype}")
    if block_tables.dtype not in _INDEX_DTYPES or seq_lens.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"block_tables and seq_lens must be int32 or int64, got {block_tables.dtype} and {seq_lens.dtype}"
        )
    devices = {t.device for t in (q, kv_cache, block_tables, seq_lens)}
    if out is not None:
        if out.shape != (batch, num_heads, kv_lora_rank) or out.dtype != q.dtype:
            raise ValueError(
                f"out must be {(batch, num_heads, kv_lora_rank)} of {q.dtype}, got {tuple(out.shape)} of {out.dtype}"
            )
        devices.add(out.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def mla_decode_bytes(
    seq_lens: Sequence[int] | torch.Tensor,
    num_heads: int,
    dim: int,
    kv_lora_rank: int,
    dtype: torch.dtype,
    cache_dtype: torch.dtype | None = None,
) -> int:
    """The fewest bytes one `mla_decode` call must move through device memory: each sequence's
    cache rows read once, q read once, the output written once, seq_lens (int32) read once.
    Not counted: block-table entries (4 bytes a page, under 0.01% of a page of 576-wide rows) and
    the partials of sequences cut into several units, which mostly stay in L2. For GB/s in benchmarks."""
    lens = [int(n) for n in (seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else seq_lens)]
    elt = torch.empty((), dtype=dtype).element_size()
    cache_elt = torch.empty((), dtype=cache_dtype or dtype).element_size()
    batch = len(lens)
    cache = sum(lens) * dim * cache_elt
    q_out = batch * num_heads * (dim + kv_lora_rank) * elt
    return cache + q_out + batch * 4
