"""INT4 W4A16 expert GEMM for Hopper in Gluon: the weights are the wgmma's register operand.

The Triton kernel (`moe_gemm._moe_gemm_kernel`) dequantizes each INT4 tile in registers, writes
it to shared memory and waits for every dot before the next dequantization: from about 32 rows
per expert its tensor-core work and its dequantization add up instead of overlapping. Here the
product is transposed, out^T (N, T) = W (N, K) x^T (K, T), so the dequantized weights are the
first operand of `wgmma`, which Hopper reads straight from registers (the Marlin / Machete
arrangement): the weights never touch shared memory after unpacking, and the dots run
asynchronously while the next sub-tile is dequantized.

One program: one expert's block of BLOCK_T rows (tokens) x BLOCK_N output columns, the expert
and its rows found from the counts as in the Triton kernel (no host table). Per k_block of 256
inputs (the repack's layout, `moe_weights.py`: word row j of a block holds input s * 32 + j in
nibble s) a ring of STAGES shared-memory buffers, filled STAGES - 1 blocks ahead, holds:
  x    8 x (BLOCK_T, 32)   the rows' inputs: one TMA box for grouped rows from 32 rows a program
                           (`x_tma_ok`), else cp.async gathered by row index (no permuted copy)
  w    (32, BLOCK_N) int32 per weight (gate and up when gated): TMA from 32 rows a program
                           (`w_tma_ok`), else cp.async
  s    (8, BLOCK_N)        the scale row of each 32-input sub-tile (cp.async), read into registers
                           one sub-tile ahead of its use
Each word tile is read once into registers in the wgmma operand layout; nibble s of every word
gives sub-tile s, (BLOCK_N, 32) weights in that same layout, dequantized two at a time with the
same PTX as the Triton kernel (`moe_gemm._pairs_asm`), so both kernels produce the same weights.

Requirements (`supported` says whether a call qualifies; `grouped_gemm` leaves the GEMM to the
Triton kernel otherwise, and after any failed launch): sm_90 (not ROCm), bf16 / fp16 activations
with scales of the same dtype, k_block 256, contiguous N (weights, scales, output), contiguous K and
16-byte-aligned rows (activations).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from moecluster.kernels.device import cuda_capability
from moecluster.kernels.moe_weights import Int4Experts

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # no Triton, or a Triton without Gluon: the callers use the Triton kernel
    gluon = None

K_BLOCK = 256  # the repack's k_block this kernel takes: 8 sub-tiles of 32 inputs (one scale group at most)


if gluon is not None:
    # The shared layouts of the TMA boxes, for the kernel's buffers and the host's descriptors alike:
    # activations (8 sub-tiles, BLOCK_T rows, 32 inputs) in 64-byte rows; words (1 expert, 32 word
    # rows, BLOCK_N columns) int32, 128-byte swizzle.
    _X_BOX = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=16, rank=3))
    _W_BOX = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=3))

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _issue_x(a_ptr, x_rows, x_mask, x_smem, kb, st, K, stride_am, EVEN_K: gl.constexpr, BLOCK_T: gl.constexpr,
                 XL: gl.constexpr):
        """cp.async of the gathered activations of the k_block from input kb into ring slot st: the 8
        sub-tiles stacked as (8 * BLOCK_T, 32) in one copy (one copy per buffer: separate copies into
        one buffer make the compiler put a CTA barrier between them)."""
        sub = gl.arange(0, 8 * BLOCK_T, layout=gl.SliceLayout(1, XL)) // BLOCK_T  # (8 * BLOCK_T,) sub-tile
        ks = kb + sub[:, None] * 32 + gl.arange(0, 32, layout=gl.SliceLayout(0, XL))[None, :]  # (8 * BLOCK_T, 32)
        if EVEN_K:
            mask = x_mask[:, None]
        else:
            mask = x_mask[:, None] & (ks < K)
        async_copy.async_copy_global_to_shared(x_smem.index(st), a_ptr + x_rows[:, None] * stride_am + ks, mask=mask)

    @gluon.jit
    def _issue(a_ptr, x_desc, x_rows, x_mask, w0_ptr, s0_ptr, w1_ptr, s1_ptr, w0_desc, w1_desc, w_off, n_mask_w, s_off,
               n_mask_s, offs_s, x_smem, x_tma, tma_bar, w0_smem, s0_smem, w1_smem, s1_smem, w0_tma, w1_tma, expert, row0,
               n0, j, st, K, stride_am, stride_wk, stride_sk, GATED: gl.constexpr, GROUP: gl.constexpr,
               EVEN_K: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, XL: gl.constexpr,
               X_TMA: gl.constexpr, W_TMA: gl.constexpr):
        """The loads of k_block j into ring slot st. By TMA, all arriving on tma_bar: the activations
        (X_TMA: grouped rows, 8 x (BLOCK_T, 32) boxes in one 3-D copy) and the words (W_TMA: a
        (32, BLOCK_N) box). By cp.async: the gathered activations, the words without W_TMA, the scale
        rows."""
        kb = j * 256
        X_BYTES: gl.constexpr = 8 * BLOCK_T * 32 * 2 if X_TMA else 0
        W_BYTES: gl.constexpr = (2 if GATED else 1) * 32 * BLOCK_N * 4 if W_TMA else 0
        if X_TMA or W_TMA:
            mbarrier.expect(tma_bar, X_BYTES + W_BYTES)
        if X_TMA:
            tma.async_copy_global_to_shared(x_desc, [kb // 32, row0, 0], tma_bar, x_tma.index(st))
        else:
            _issue_x(a_ptr, x_rows, x_mask, x_smem, kb, st, K, stride_am, EVEN_K, BLOCK_T, XL)
        if W_TMA:
            tma.async_copy_global_to_shared(w0_desc, [expert, kb // 8, n0], tma_bar, w0_tma.index(st))
            if GATED:
                tma.async_copy_global_to_shared(w1_desc, [expert, kb // 8, n0], tma_bar, w1_tma.index(st))
        else:
            w_rows = (kb // 8) * stride_wk
            async_copy.async_copy_global_to_shared(w0_smem.index(st), w0_ptr + w_off + w_rows, mask=n_mask_w)
            if GATED:
                async_copy.async_copy_global_to_shared(w1_smem.index(st), w1_ptr + w_off + w_rows, mask=n_mask_w)
        s_rows = ((kb + offs_s * 32) // GROUP) * stride_sk  # (8,) the group of each sub-tile
        async_copy.async_copy_global_to_shared(s0_smem.index(st), s0_ptr + s_off + s_rows[:, None], mask=n_mask_s)
        if GATED:
            async_copy.async_copy_global_to_shared(s1_smem.index(st), s1_ptr + s_off + s_rows[:, None], mask=n_mask_s)

    @gluon.constexpr_function
    def _nibble_asm(s, magic_bits, packed_type):
        """PTX for nibble s of two words -> two 16-bit weights times their scale pair: the byte holding
        the nibble is taken from each word by one `prmt` into the pair's two halves (shifted down
        when the nibble is the byte's high one), masked and OR-ed into the magic constant's mantissa
        (one `lop3`), minus the bias (magic + 8), times the scales: the values of
        `moe_gemm._pairs_asm`, which shifts each word by 4 s first (two more instructions a pair)."""
        b = s // 2
        sel = b | (b << 4) | ((4 + b) << 8) | ((4 + b) << 12)
        ones, bias = magic_bits * 0x10001, (magic_bits | 8) * 0x10001
        shift = "shr.u32 %wt, %wt, 4; " if s % 2 else ""
        # lop3 0xEA is (a & b) | c. Written out as `and` + `or` of immediates, ptxas emits two
        # instructions (SASS of the 16 x 64 gated kernel: 1,456 instructions with them, 1,328 with this).
        return (f"{{ .reg .b32 %wt, %wm, %wo; prmt.b32 %wt, $1, $2, {sel:#06x}; {shift}mov.b32 %wo, {ones:#010x}; "
                f"lop3.b32 %wt, %wt, 0x000F000F, %wo, 0xEA; mov.b32 %wm, {bias:#010x}; "
                f"sub.rn.{packed_type} %wt, %wt, %wm; mul.rn.{packed_type} $0, %wt, $3; }}")

    @gluon.jit
    def _dequant(words, s: gl.constexpr, scale, MAGIC_BITS: gl.constexpr, PACKED: gl.constexpr):
        """Nibble s of words (BLOCK_N, 32) int32 times scale (BLOCK_N, 1) -> (BLOCK_N, 32) in the scale's
        dtype, two weights per instruction sequence (consecutive inputs of one output column)."""
        return gl.inline_asm_elementwise(_nibble_asm(s, MAGIC_BITS, PACKED), "=r,r,r,r",
                                         [words, gl.broadcast(scale, words)[0]], dtype=scale.dtype, is_pure=True,
                                         pack=2)

    @gluon.jit(do_not_specialize=("n_rows", "n_tblocks"))
    def int4_wgmma_kernel(
        a_ptr,  # (a_rows, K) activations, K contiguous; grouped row r is a[src[r]] when GATHER
        x_desc,  # X_TMA: a as (K / 32, a_rows, 32) with boxes (8, BLOCK_T, 32); else None
        src_ptr,  # (n_rows,) int, read only when GATHER
        counts_ptr,  # (E,) int rows per expert
        w0_ptr,  # int32 (E, K_pad / 8, N), N contiguous: gate, or the only weight
        s0_ptr,  # (E, K_pad / GROUP, N), N contiguous, the activations' dtype
        w1_ptr,  # up (GATED only), same strides
        w0_desc,  # W_TMA: w0 and w1 as (E, K_pad / 8, N) with boxes (1, 32, BLOCK_N); else None
        w1_desc,
        s1_ptr,
        c_ptr,  # (n_rows, N) output, grouped order, N contiguous
        n_rows,
        n_tblocks,  # row blocks in the grid (an upper bound of the real ones)
        num_experts,
        N,
        K,
        stride_am,
        stride_we,
        stride_wk,
        stride_se,
        stride_sk,
        stride_cm,
        MAGIC_BITS: gl.constexpr,  # 16-bit pattern OR-ed with a nibble to give (magic + nibble) exactly
        PACKED: gl.constexpr,  # "bf16x2" or "f16x2": the activations' packed PTX type
        BLOCK_T: gl.constexpr,
        BLOCK_N: gl.constexpr,
        BLOCK_E: gl.constexpr,
        GATED: gl.constexpr,
        GATHER: gl.constexpr,
        GROUP: gl.constexpr,
        STAGES: gl.constexpr,
        EVEN_K: gl.constexpr,
        X_TMA: gl.constexpr,  # the activations by TMA (grouped rows, K % 32 == 0), else cp.async
        W_TMA: gl.constexpr,  # the words by TMA, else cp.async
        num_warps: gl.constexpr,
    ):
        dtype: gl.constexpr = a_ptr.dtype.element_ty
        pid = gl.program_id(0)
        n_nblocks = gl.cdiv(N, BLOCK_N)  # the programs of one row block run together (its rows stay in L2;
        pid_t = pid // n_nblocks  # the other order, row blocks of one column block together, timed the same)
        pid_n = pid % n_nblocks

        # ---- the expert and rows of this row block, from the counts
        EL: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        e_idx = gl.arange(0, BLOCK_E, layout=EL)
        cnt = gl.load(counts_ptr + e_idx, mask=e_idx < num_experts, other=0).to(gl.int32)  # (BLOCK_E,)
        nblk = (cnt + BLOCK_T - 1) // BLOCK_T
        blk_end = gl.associative_scan(nblk, 0, _add)
        row_end = gl.associative_scan(cnt, 0, _add)
        if pid_t < gl.sum(nblk, axis=0):
            expert = gl.sum((blk_end <= pid_t).to(gl.int32), axis=0)
            mine = e_idx == expert
            first_row = gl.sum(gl.where(mine, row_end - cnt, 0), axis=0)
            stop_row = gl.sum(gl.where(mine, row_end, 0), axis=0)
            first_blk = gl.sum(gl.where(mine, blk_end - nblk, 0), axis=0)
            row0 = first_row + (pid_t - first_blk) * BLOCK_T
            n0 = pid_n * BLOCK_N
            e64 = expert.to(gl.int64)

            # ---- layouts: wgmma (BLOCK_N, BLOCK_T) accumulators, the weights as its register operand
            MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                          instr_shape=[16, BLOCK_T, 16])
            A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
            XL: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [num_warps, 1], [1, 0])  # (BLOCK_T, 32) 16-bit
            TPN_W: gl.constexpr = BLOCK_N // 4 if BLOCK_N < 128 else 32
            WL: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TPN_W, TPN_W], [num_warps, 1], [1, 0])  # (32, BLOCK_N)
            SL: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [num_warps, 1], [1, 0])  # (8, BLOCK_N)
            X_SH: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=16, rank=2)
            if W_TMA:
                W_SH: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
            else:
                W_SH: gl.constexpr = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0])
            S_SH: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
            S_ROWS: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])

            x_smem = gl.allocate_shared_memory(dtype, [STAGES, 8 * BLOCK_T, 32], X_SH)  # 8 sub-tiles stacked
            x_tma = x_smem._reinterpret(dtype, [STAGES, 8, BLOCK_T, 32], _X_BOX)  # the same bytes as TMA boxes
            w0_smem = gl.allocate_shared_memory(gl.int32, [STAGES, 32, BLOCK_N], W_SH)
            s0_smem = gl.allocate_shared_memory(dtype, [STAGES, 8, BLOCK_N], S_SH)
            if GATED:
                w1_smem = gl.allocate_shared_memory(gl.int32, [STAGES, 32, BLOCK_N], W_SH)
                s1_smem = gl.allocate_shared_memory(dtype, [STAGES, 8, BLOCK_N], S_SH)
            else:
                w1_smem = w0_smem
                s1_smem = s0_smem
            w0_tma = w0_smem._reinterpret(gl.int32, [STAGES, 1, 32, BLOCK_N], _W_BOX)
            w1_tma = w1_smem._reinterpret(gl.int32, [STAGES, 1, 32, BLOCK_N], _W_BOX)

            # ---- load addressing
            # row r of a stacked x tile is sub-tile r // BLOCK_T, grouped row row0 + r % BLOCK_T
            if X_TMA:  # (the TMA box reads rows past the expert's: they only feed output columns not stored)
                x_rows = 0
                x_mask = 0
            else:
                offs_t = row0 + gl.arange(0, 8 * BLOCK_T, layout=gl.SliceLayout(1, XL)) % BLOCK_T  # (8 * BLOCK_T,)
                x_mask = (offs_t < stop_row) & (offs_t < n_rows)
                if GATHER:
                    x_rows = gl.load(src_ptr + offs_t, mask=x_mask, other=0).to(gl.int64)
                else:
                    x_rows = offs_t.to(gl.int64)
            if W_TMA:
                w_off = 0
                n_mask_w = 0
            else:
                offs_j = gl.arange(0, 32, layout=gl.SliceLayout(1, WL))
                offs_nw = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, WL))
                w_off = e64 * stride_we + offs_j[:, None] * stride_wk + offs_nw[None, :]  # (32, BLOCK_N)
                n_mask_w = gl.broadcast(offs_nw[None, :] < N, w_off)[0]
            offs_s = gl.arange(0, 8, layout=gl.SliceLayout(1, SL))
            offs_ns = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, SL))
            s_off = e64 * stride_se + offs_ns[None, :]  # (1, BLOCK_N)
            n_mask_s = gl.broadcast(offs_ns[None, :] < N, offs_s[:, None] + s_off)[0]

            # ready[st]: every thread's copies into slot st have landed (cp.async arrives per thread);
            # tma_ready[st]: the TMA copies into slot st have (X_TMA or W_TMA)
            ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            tma_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for b in gl.static_range(STAGES):
                mbarrier.init(ready.index(b), count=32 * num_warps)
                if X_TMA or W_TMA:
                    mbarrier.init(tma_ready.index(b), count=1)
            gl.thread_barrier()
            n_k = gl.cdiv(K, 256)
            for j in gl.static_range(STAGES - 1):
                if j < n_k:
                    _issue(a_ptr, x_desc, x_rows, x_mask, w0_ptr, s0_ptr, w1_ptr, s1_ptr, w0_desc, w1_desc, w_off,
                           n_mask_w, s_off, n_mask_s, offs_s, x_smem, x_tma, tma_ready.index(j), w0_smem, s0_smem,
                           w1_smem, s1_smem, w0_tma, w1_tma, expert, row0, n0, j, j, K, stride_am, stride_wk, stride_sk,
                           GATED, GROUP, EVEN_K, BLOCK_T, BLOCK_N, XL, X_TMA, W_TMA)
                    async_copy.mbarrier_arrive(ready.index(j), increment_count=False)

            # the scale rows, one per sub-tile (unswizzled, so a flat view of the same bytes)
            s0_rows = s0_smem._reinterpret(dtype, [STAGES * 8, BLOCK_N], S_ROWS)
            s1_rows = s1_smem._reinterpret(dtype, [STAGES * 8, BLOCK_N], S_ROWS)
            x_subs = x_smem._reinterpret(dtype, [STAGES * 8, BLOCK_T, 32], X_SH)  # sub-tile views
            acc0 = gl.zeros((BLOCK_N, BLOCK_T), gl.float32, layout=MMA)
            acc1 = gl.zeros((BLOCK_N, BLOCK_T), gl.float32, layout=MMA)
            SC: gl.constexpr = gl.SliceLayout(1, A_OP)
            NPROJ: gl.constexpr = 2 if GATED else 1  # wgmma groups per sub-tile
            p0 = gl.zeros((BLOCK_N, 32), dtype, layout=A_OP)  # the sub-tile whose dots are in flight
            p1 = gl.zeros((BLOCK_N, 32), dtype, layout=A_OP)
            for i in range(n_k):
                st = i % STAGES
                mbarrier.wait(ready.index(st), (i // STAGES) & 1)  # k_block i has landed
                if X_TMA or W_TMA:
                    mbarrier.wait(tma_ready.index(st), (i // STAGES) & 1)
                fence_async_shared()  # the copies visible to the wgmma's async proxy
                words0 = w0_smem.index(st).permute((1, 0)).load(A_OP)  # (BLOCK_N, 32) int32
                a0 = _dequant(words0, 0, s0_rows.index(st * 8).load(SC)[:, None], MAGIC_BITS, PACKED)
                if GATED:
                    words1 = w1_smem.index(st).permute((1, 0)).load(A_OP)
                    a1 = _dequant(words1, 0, s1_rows.index(st * 8).load(SC)[:, None], MAGIC_BITS, PACKED)
                # from 32 rows the scale rows are read one sub-tile ahead of their dequantization (read
                # just before, they left each sub-tile's last multiplies waiting on shared memory: 0.7-2.0%
                # a round at 32 and 64 rows; at 16, 0.2-0.7% slower on an H200 with 384 experts)
                AHEAD: gl.constexpr = BLOCK_T >= 32
                if AHEAD:
                    c0 = s0_rows.index(st * 8 + 1).load(SC)[:, None]
                    if GATED:
                        c1 = s1_rows.index(st * 8 + 1).load(SC)[:, None]
                gl.thread_barrier()  # every warp group is done with the previous k_block's slot
                for s in gl.static_range(8):
                    xb = x_subs.index(st * 8 + s).permute((1, 0))  # (32, BLOCK_T)
                    acc0 = warpgroup_mma(a0, xb, acc0, is_async=True)
                    if GATED:
                        acc1 = warpgroup_mma(a1, xb, acc1, is_async=True)
                    if s == 0:  # refill the previous k_block's slot while the first dots run
                        nxt = i + STAGES - 1
                        if nxt < n_k:
                            _issue(a_ptr, x_desc, x_rows, x_mask, w0_ptr, s0_ptr, w1_ptr, s1_ptr, w0_desc, w1_desc,
                                   w_off, n_mask_w, s_off, n_mask_s, offs_s, x_smem, x_tma, tma_ready.index(nxt % STAGES),
                                   w0_smem, s0_smem, w1_smem, s1_smem, w0_tma, w1_tma, expert, row0, n0, nxt,
                                   nxt % STAGES, K, stride_am, stride_wk, stride_sk, GATED, GROUP, EVEN_K, BLOCK_T,
                                   BLOCK_N, XL, X_TMA, W_TMA)
                            async_copy.mbarrier_arrive(ready.index(nxt % STAGES), increment_count=False)
                    if s < 7:  # the next sub-tile's weights while these dots run
                        if AHEAD:
                            d0 = c0
                            if GATED:
                                d1 = c1
                            if s < 6:
                                c0 = s0_rows.index(st * 8 + s + 2).load(SC)[:, None]
                                if GATED:
                                    c1 = s1_rows.index(st * 8 + s + 2).load(SC)[:, None]
                        else:
                            d0 = s0_rows.index(st * 8 + s + 1).load(SC)[:, None]
                            if GATED:
                                d1 = s1_rows.index(st * 8 + s + 1).load(SC)[:, None]
                        b0 = _dequant(words0, s + 1, d0, MAGIC_BITS, PACKED)
                        if GATED:
                            b1 = _dequant(words1, s + 1, d1, MAGIC_BITS, PACKED)
                    if s > 0:  # the previous sub-tile's dots are done: its registers may be reused
                        acc0, acc1, p0, p1 = warpgroup_mma_wait(num_outstanding=NPROJ, deps=(acc0, acc1, p0, p1))
                    p0 = a0
                    if GATED:
                        p1 = a1
                    if s < 7:
                        a0 = b0
                        if GATED:
                            a1 = b1
                # no dot in flight across the loop's back edge: ptxas serializes every wgmma of a
                # kernel where other instructions may write an accumulator while one is in flight
                acc0, acc1, p0, p1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1, p0, p1))
            for b in gl.static_range(STAGES):
                mbarrier.invalidate(ready.index(b))
                if X_TMA or W_TMA:
                    mbarrier.invalidate(tma_ready.index(b))

            # ---- epilogue: silu(gate) * up, stored transposed back to (rows, N)
            if GATED:
                res = acc0 / (1.0 + gl.exp(-acc0)) * acc1
            else:
                res = acc0
            OL: gl.constexpr = gl.BlockedLayout([4, 1], [16, 2], [1, num_warps], [0, 1])  # (BLOCK_N, BLOCK_T), N fastest
            res = gl.convert_layout(res.to(c_ptr.dtype.element_ty), OL)
            offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, OL))
            offs_c = row0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, OL))
            c_mask = (offs_n[:, None] < N) & (offs_c[None, :] < stop_row) & (offs_c[None, :] < n_rows)
            gl.store(c_ptr + offs_c.to(gl.int64)[None, :] * stride_cm + offs_n[:, None], res, mask=c_mask)


@dataclass(frozen=True)
class WgmmaTiles:
    """Tiles of `int4_wgmma_kernel`: rows (tokens) per program, output columns per program (16 per
    warp: each warp owns 16 of the wgmma's M), ring depth."""

    block_t: int = 64
    block_n: int = 64
    num_warps: int = 4
    stages: int = 2


def enabled() -> bool:
    """The Gluon kernel is used where it qualifies unless MOECLUSTER_INT4_GLUON=0 (then the Triton kernel
    runs every INT4 GEMM: a way around a Triton / driver combination where Gluon misbehaves)."""
    return gluon is not None and os.environ.get("MOECLUSTER_INT4_GLUON", "1") != "0"


def supported(a: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, k_block: int, c: torch.Tensor) -> bool:
    """Whether `launch` takes this GEMM (else the Triton kernel does)."""
    return (
        enabled()
        and a.is_cuda
        and torch.version.hip is None  # (gfx90a / gfx942 report capability 9 too)
        and cuda_capability(a.device)[0] == 9
        and a.stride(0) % 8 == 0  # 16-byte aligned rows: x arrives by 16-byte cp.async
        and a.data_ptr() % 16 == 0
        and a.dtype in (torch.bfloat16, torch.float16)
        and scale.dtype == a.dtype
        and k_block == K_BLOCK
        and a.stride(1) == 1
        and packed.stride(2) == 1
        and scale.stride(2) == 1
        and c.stride(1) == 1
    )


def default_tiles(rows_per_expert: float, gated: bool) -> WgmmaTiles:
    """Tiles by mean rows per expert, from sweeps of `scripts/time_int4_wgmma.py` on an H100 and an
    H200 (`docs/results/int4-wgmma-h{100,200}*.json`; DeepSeek-V3 / Kimi-K2 shapes, 32 and 384
    experts): as many rows per program as the experts hold up to 64 (the weights are read once per
    row block); above 32 rows gate_up takes 64 columns over 4 warps (two accumulators) up to 128
    rows and 128 over 8 above (4.5% faster at 512; where between 64 and 512 rows the two cross was
    not measured), the down GEMM (N 7168) 128 columns over 4 warps
    (4% faster than 8 at 64 rows, 11% at 512); 2 stages throughout (a third costs occupancy and
    was slower everywhere). Up to 16 rows (session 17, `scripts/time_int4_wgmma.py 2,6,11,16 384` on an
    H200, `docs/results/int4-wgmma-h200-384experts-session17.json`): the down GEMM takes 128 columns
    over 4 warps (two wgmma M blocks a warp group), 2-20% faster than 64 at 2 to 16 rows; gate_up
    keeps 64 columns to 12 rows (128 was 5-8% slower at 2 to 11 rows, 7% faster at 16)."""
    if rows_per_expert <= 16:
        return WgmmaTiles(16, 128 if not gated or rows_per_expert > 12 else 64, 4, 2)
    if rows_per_expert <= 32:
        return WgmmaTiles(32, 64, 4, 2)
    if gated:
        return WgmmaTiles(64, 64, 4, 2) if rows_per_expert <= 128 else WgmmaTiles(64, 128, 8, 2)
    return WgmmaTiles(64, 128, 4, 2)


def check_tiles(tiles: WgmmaTiles) -> None:
    """Raise ValueError for tiles the kernel cannot take: rows per program a wgmma N (16 to 128), 16
    output columns per warp in whole warp groups (4 or 8 warps), a ring of at least 2 slots."""
    bt, bn, warps = tiles.block_t, tiles.block_n, tiles.num_warps
    if bt not in (16, 32, 64, 128) or bn not in (64, 128, 256) or warps not in (4, 8) or bn % (16 * warps):
        raise ValueError(f"int4_wgmma: unsupported tiles {tiles}")
    if tiles.stages < 2:
        raise ValueError(f"int4_wgmma: stages must be >= 2, got {tiles.stages}")


def launch(a: torch.Tensor, src_rows: torch.Tensor | None, counts: torch.Tensor, w0: torch.Tensor, s0: torch.Tensor,
           w1: torch.Tensor, s1: torch.Tensor, c: torch.Tensor, rows: int, n: int, k: int, gated: bool, group: int,
           magic_bits: int, tiles: WgmmaTiles) -> None:
    """c (rows, n) = [silu(a @ w0^T) * (a @ w1^T) if gated else a @ w0^T] per expert's rows, w INT4 in
    the repack's layout (E, K_pad / 8, n) with scales (E, K_pad / group, n); `supported` must hold."""
    check_tiles(tiles)
    bt, bn, warps = tiles.block_t, tiles.block_n, tiles.num_warps
    e = counts.shape[0]
    n_tblocks = (rows + min(e, rows) * (bt - 1)) // bt  # >= sum over experts of cdiv(count, bt)
    grid = (n_tblocks * triton.cdiv(n, bn),)
    x_desc = None
    if x_tma_ok(a, src_rows, k, bt):  # a seen as (K / 32, rows, 32): a box is a k_block's 8 sub-tiles of bt rows
        x_desc = TensorDescriptor(a, [k // 32, a.shape[0], 32], [32, a.stride(0), 1], [8, bt, 32], _X_BOX.value)
    w0_desc = w1_desc = None
    if w_tma_ok(w0, w1, bt):  # boxes of (1 expert, 32 word rows, bn columns); down reads w0 alone
        w0_desc = TensorDescriptor(w0, list(w0.shape), list(w0.stride()), [1, 32, bn], _W_BOX.value)
        w1_desc = TensorDescriptor(w1, list(w1.shape), list(w1.stride()), [1, 32, bn], _W_BOX.value) if gated else w0_desc
    int4_wgmma_kernel[grid](
        a, x_desc, src_rows if src_rows is not None else counts, counts, w0, s0, w1, w0_desc, w1_desc, s1, c,
        rows, n_tblocks, e, n, k,
        a.stride(0), w0.stride(0), w0.stride(1), s0.stride(0), s0.stride(1), c.stride(0),
        MAGIC_BITS=magic_bits, PACKED="bf16x2" if a.dtype == torch.bfloat16 else "f16x2",
        BLOCK_T=bt, BLOCK_N=bn, BLOCK_E=max(32 * warps, triton.next_power_of_2(e)), GATED=gated,
        GATHER=src_rows is not None, GROUP=group, STAGES=tiles.stages, EVEN_K=(k % K_BLOCK == 0),
        X_TMA=x_desc is not None, W_TMA=w0_desc is not None, num_warps=warps,
    )  # fmt: skip


# Rows per program from which the loads go by TMA. At 16 (decode sizes) the activations by TMA were
# 2% slower at 8 rows per expert and the words by TMA as fast as cp.async (H100 A/B,
# docs/performance.md); from 32 rows TMA, with the scale rows read ahead, took 6% off at 32 and
# 10-12% at 64, mostly by sparing each thread 16 cp.async of activations and 8 of words a k_block,
# with their 64-bit addresses (212 -> 168 registers for gate_up at 64 x 64).
TMA_MIN_ROWS = 32


def x_tma_ok(a: torch.Tensor, src_rows: torch.Tensor | None, k: int, block_t: int) -> bool:
    """Whether the activations go by TMA: grouped rows (not gathered), K a whole number of 32-input
    sub-tiles (the view (K / 32, rows, 32) covers exactly K), 16-byte aligned base and row stride (TMA's
    rule, also `supported`'s), block_t >= TMA_MIN_ROWS."""
    return (src_rows is None and k % 32 == 0 and block_t >= TMA_MIN_ROWS and a.data_ptr() % 16 == 0
            and a.stride(0) * a.element_size() % 16 == 0 and a.stride(1) == 1)


def w_tma_ok(w0: torch.Tensor, w1: torch.Tensor, block_t: int) -> bool:
    """Whether the words go by TMA: 16-byte aligned bases and strides (TMA's rule), contiguous
    columns, block_t >= TMA_MIN_ROWS."""
    return block_t >= TMA_MIN_ROWS and all(
        w.dtype == torch.int32 and w.data_ptr() % 16 == 0 and w.stride(0) % 4 == 0 and w.stride(1) % 4 == 0
        and w.stride(2) == 1 for w in (w0, w1))


_FAILED = False  # a launch failed: the Triton kernel for the rest of the process


def grouped_gemm(a: torch.Tensor, src_rows: torch.Tensor | None, counts: torch.Tensor, weights: Int4Experts, gated: bool,
                 c: torch.Tensor, magic_bits: int) -> bool:
    """One of `fused_moe.grouped_mlp`'s two INT4 GEMMs with this kernel and its default tiles, when it
    qualifies (`supported`): gate_up (gated) a (rows or gathered rows, H) -> c (rows, I), or down
    (rows, I) -> (rows, H). False leaves it to the Triton kernel: not supported, or a launch failed
    (the kernel is written against Triton 3.6's Gluon, an experimental API; the first failure is
    warned once and the rest of the process runs Triton)."""
    global _FAILED
    q0, q1 = (weights.gate, weights.up) if gated else (weights.down, weights.down)
    if _FAILED or not supported(a, q0.packed, q0.scale, q0.k_block, c):
        return False
    rows = c.shape[0]
    n, k = (weights.intermediate, weights.hidden) if gated else (weights.hidden, weights.intermediate)
    try:
        launch(a, src_rows, counts, q0.packed, q0.scale, q1.packed, q1.scale, c, rows, n, k, gated, q0.group_size,
               magic_bits, default_tiles(rows / weights.num_experts, gated))
    except Exception as e:  # noqa: BLE001 - any compile / launch failure falls back, once, loudly
        _FAILED = True
        warnings.warn(f"the Gluon INT4 kernel failed ({type(e).__name__}: {str(e)[:300]}); using the Triton kernel",
                      RuntimeWarning, stacklevel=2)
        return False
    return True
