"""Fused MoE expert MLPs in Triton: the grouped SwiGLU over rows already grouped by expert, and a
full top-k MoE (permute, grouped MLP, weighted combine) for standalone use and benchmarks.

Batch flow of `grouped_mlp(x, counts, weights)`, rows grouped by local expert (expert 0's rows,
then expert 1's, ...; a count may be 0), every step on the device and with no host sync:

  1. gate_up kernel: for BLOCK_M rows of ONE expert x BLOCK_N columns of I it accumulates
     x @ gate^T and x @ up^T in two fp32 accumulators and writes silu(g) * u   -> h (rows, I)
  2. down kernel (the same kernel, not gated): h @ down^T                       -> out (rows, H)

Programs cover (m-block, n-block) pairs. The m-block count is an upper bound of the number of
per-expert row blocks, `(rows + min(E, rows) * (BLOCK_M - 1)) // BLOCK_M`, so the grid never
needs the counts on the host (each kernel has its own BLOCK_M; no block table is built). Each
program loads the E counts (a few hundred bytes, from L2), takes the cumsum of per-expert block
counts in registers and finds its expert and its row range; programs past the last block exit at
once. Rows past the expert's end are masked, so a block never mixes experts.

Launch order (`TileConfig.group_m`): with 0 the m-block runs fastest over ALL m-blocks, so the
programs running at the same time share one weight tile and each activation row is read from HBM
once per n-block (fine for decode: a few rows per expert). With group_m = G the programs walk G
m-blocks x every n-block before the next G m-blocks, so the activations of G blocks and the
weights of the experts they belong to stay in L2 (prefill: without it, at 512 rows per expert the
activations were re-read once per n-block, about twice the weight bytes).

Weights, the "logical" shapes follow the checkpoint (nn.Linear: (out, in) per expert):

  DenseExperts: gate (E, I, H), up (E, I, H), down (E, H, I), any strides, so the model's own
    stacked buffers are used as they are (no copy, no concatenation; the kernel keeps two
    pointers and two accumulators for gate and up).
  Int4Experts: one Int4Weight per projection, repacked once at load time by `repack_int4` from
    the compressed-tensors pack-quantized layout (weight_packed int32 (E, out, in/8), 8
    consecutive inputs per word, value k as the nibble q + 8 at bits 4k..4k+3; weight_scale
    (E, out, in/32)) into the kernel's layout:

      packed int32 (E, K_pad / 8, N), N (= out) contiguous
      scale        (E, K_pad / group, N), N contiguous, the checkpoint's dtype
      K_pad = in rounded up to k_block (256 where the group size is a multiple of 32, else 128);
      padding is q = 0 with scale 0.
      Within each k_block of inputs, with P = k_block / 8 (32 by default), word row b*P + j
      holds input k = b*k_block + s*P + j in nibble s (bits 4s..4s+3), for s = 0..7.

    So one (P, BLOCK_N) tile of words, loaded once and fully coalesced along N, unpacks with a
    shift and a mask into 8 sub-tiles (P, BLOCK_N); sub-tile s covers the CONTIGUOUS inputs
    [b*k_block + s*P, ... + P), which lie inside one quantization group (P divides the group
    size), so the activation sub-tile is a plain contiguous (BLOCK_M, P) load and each sub-tile
    needs one (BLOCK_N,) scale row; the K loop makes 8 tl.dot calls of depth P per k_block. No
    weight byte is loaded twice and no reshape/join/interleave is needed (the layout does the
    un-interleaving). P = 32 (one group per sub-tile) halves the loads, scale rows and dots per
    input of P = 16: on an H100, 8% faster at 8 rows per expert and 19% at 32.
    `TileConfig.int4_stack` = S > 1 instead stacks S unpacked sub-tiles along a leading axis and
    merges it with the rows (input order) for one (S * P, BLOCK_N) tile per dot: fewer, deeper
    MMAs, the default above 32 rows per expert (measured at 64; at 32 stacking was 1.9x slower,
    33-63 rows not measured). W4A16: q * scale in the activation
    dtype feeds tl.dot. For fp16 / bf16 the nibble is OR-ed into the mantissa of a magic constant
    (fp16 1024.0, bf16 128.0) and the bias subtracted, which gives q exactly with no int->float
    conversion; on sm_90 `_dequant_pairs` does the same in inline PTX on pairs of weights
    (`TileConfig.int4_ptx`; ptxas already pairs the scalar form's arithmetic into HMUL2 / HADD2,
    so this saves little: with the default tiles level at decode sizes and 2-3% at 512 / 4096
    rows per expert, bit-identical outputs; 11% at 64 rows with k_block 128 and one sub-tile per
    dot); fp32 converts.

`fused_moe(hidden, topk_ids, topk_weights, weights)` sorts the T*k (token, slot) pairs by expert
(stable argsort), counts rows per expert (scatter_add, no sync), runs the grouped MLP with the
gate_up kernel gathering its rows straight from `hidden` (no permuted copy), then a combine kernel
sums each token's k rows times its routing weights in fp32, deterministically (no atomics).

FP8 weights (DeepSeek-V3's e4m3 with 128 x 128 block scales) run in one of two modes. W8A16:
each e4m3 tile is converted to the activation dtype and the block's scale applied to the tile's
fp32 partial product (decode-sized batches: weight-bandwidth bound, activations exact). W8A8
(`fp8_activations`, the default from W8A8_MIN_ROWS rows per expert with 16-bit activations,
on Hopper, outside `w8a16_only`, which the decode CUDA graphs' warm-up and capture run in;
routed experts also at any rows inside `w8a16_only(experts_w8a8=True)`, `w8a8_experts_default`;
linears from W8A8_LINEAR_MIN_ROWS rows, inside `w8a16_only` from W8A8_DECODE_LINEAR_MIN_ROWS
with linears_w8a8):
x and h are quantized to e4m3 per (row, 128-value group) by `kernels/fp8_quant.py` and each
K block is one e4m3 x e4m3 dot scaled by (activation scale x weight scale), DeepSeek-V3's own
recipe; about 4% relative difference from W8A16 on random data, 1.8-3.1x faster from 64 rows
per expert on an H100.

INT4 on Hopper (sm_90, 16-bit activations, k_block 256) runs the Gluon kernel of
`kernels/int4_wgmma.py` instead, the weights as the wgmma's register operand: 1.2-1.7x faster
than the Triton kernel from 8 to 4096 rows per expert on an H100 and bit-identical to it;
explicit tiles (tuning) and MOECLUSTER_INT4_GLUON=0 keep the Triton kernel, and so does a Gluon
compile failure (warned once, `int4_wgmma.grouped_gemm`).

Dispatch: the launchers run Triton on CUDA tensors, and on CPU tensors when the kernels were
defined under TRITON_INTERPRET=1 (tests); otherwise (CPU, or Triton not installed) they run the
torch references (kernels/fused_moe_ref.py), which loop over experts with dequantized weights in
fp32 and round where the kernels round (h and the expert outputs in the activation dtype).
"""

from __future__ import annotations

from typing import Sequence

import torch

from moecluster.kernels import grouped_mm_mlp, int4_wgmma
from moecluster.kernels.device import cuda_capability, cuda_sm_count
from moecluster.kernels.fp8_quant import (
    W8A8_DECODE_LINEAR_MIN_ROWS,
    W8A8_LINEAR_MIN_ROWS,
    W8A8_MIN_ROWS,
    check_w8a8_block,
    quantize_fp8_groups,
    w8a8_default,
    w8a8_experts_default,
    w8a8_linear_default,
    w8a16_only,
)
from moecluster.kernels.fused_moe_ref import (
    expert_weights_dense,
    fp8_round_trip,
    fused_moe_reference,
    grouped_mlp_reference,
)
from moecluster.kernels.jit import jit
from moecluster.kernels.moe_tiles import TileConfig, default_tiles, fp32_tiles, W8A8_SHORT_K_STEPS, linear_split_k, linear_tiles, w8a8_linear_tiles, w8a8_tiles
from moecluster.kernels.moe_weights import (
    _FLOAT_DTYPES,
    _MIN_DOT,
    DenseExperts,
    ExpertWeights,
    Fp8Experts,
    Int4Experts,
    Int4Weight,
    _desc,
    dequantize_fp8,
    dequantize_int4,
    repack_int4,
    unrepack_int4,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch references are the whole implementation
    triton = None
    tl = None


# INT4 with 16-bit activations: (bits OR-ed into the nibble, bias subtracted), see `_dequant`.
_MAGIC = {torch.float16: (0x6400, 1032.0), torch.bfloat16: (0x4300, 136.0)}


def _pairs_asm(magic_bits: int, packed_type: str) -> str:
    """`_dequant_pairs`'s PTX for one 16-bit type: both halves OR-ed with the magic bits, minus the
    bias's bits (magic + 8), times the scale pair."""
    ones, bias = magic_bits * 0x10001, (magic_bits | 8) * 0x10001
    return ("{ .reg .b32 %wa, %wb, %wt, %wm; shr.u32 %wa, $1, $3; shr.u32 %wb, $2, $4; "
            f"prmt.b32 %wt, %wa, %wb, 0x5410; and.b32 %wt, %wt, 0x000F000F; or.b32 %wt, %wt, {ones:#010x}; "
            f"mov.b32 %wm, {bias:#010x}; sub.rn.{packed_type} %wt, %wt, %wm; mul.rn.{packed_type} $0, %wt, $5; }}")


if tl is not None:  # module-level strings a kernel reads must be constexpr
    _PAIRS_BF16 = tl.constexpr(_pairs_asm(_MAGIC[torch.bfloat16][0], "bf16x2"))
    _PAIRS_F16 = tl.constexpr(_pairs_asm(_MAGIC[torch.float16][0], "f16x2"))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # fp32 activations: exact fp32 products, not TF32
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@jit
def _dequant(words, shift, scale, dtype: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_BIAS: tl.constexpr,
             DEQ_PTX: tl.constexpr):
    """(((words >> shift) & 0xF) - 8) * scale -> dtype, elementwise over broadcast shapes: one
    sub-tile (words (SUB_K, BLOCK_N), shift (1, 1), scale (1, BLOCK_N)) or stacked ones (words
    (1, SUB_K, BLOCK_N), shifts (STACK, 1, 1), scales (STACK, 1, BLOCK_N)).

    q * scale is exact in fp32 and rounded once to dtype, like the reference. With MAGIC_BITS
    (fp16: 0x6400 = 1024.0, bf16: 0x4300 = 128.0) the nibble n = q + 8 is OR-ed into the mantissa
    to give the exact value MAGIC + n, minus MAGIC + 8 gives q: no int->float conversion (the
    conversion units bounded decode), and q * scale rounded once in dtype is the same value
    (for fp16 activations as long as the scale is a normal fp16 number). DEQ_PTX (sm_90): the
    same values two weights at a time (`_dequant_pairs`)."""
    if DEQ_PTX:
        w = _dequant_pairs(words, shift, scale.to(dtype), dtype)
    else:
        nib = (words >> shift) & 0xF
        if MAGIC_BITS != 0:
            q = (nib | MAGIC_BITS).to(tl.int16).to(dtype, bitcast=True) - tl.full([], MAGIC_BIAS, dtype)
            w = q * scale.to(dtype)
        else:
            w = ((nib - 8).to(tl.float32) * scale.to(tl.float32)).to(dtype)
    return w


@jit
def _dequant_pairs(words, shift, scale, dtype: tl.constexpr):
    """((words >> shift) & 0xF) - 8) * scale in dtype (bf16 / fp16), two weights per instruction.

    Inline PTX over pairs of elements (sm_90 for the bf16x2 arithmetic): the two words' shifted
    low halves are permuted into one register (`prmt`), masked to their nibbles and OR-ed into
    the magic constant's mantissa (ptxas fuses the two into one `lop3`), and one packed subtract
    and one packed multiply give both weights, already paired as the dot's shared-memory tile
    wants them. Values are identical: (MAGIC + n) - (MAGIC + 8) = q exactly, and q * s is rounded
    once. Element order within a pair does not matter (every lane of the pair uses its own word,
    shift and scale), so any layout Triton picks is correct."""
    if dtype == tl.bfloat16:  # (a constexpr string cannot be bound to a name inside a kernel)
        w = tl.inline_asm_elementwise(_PAIRS_BF16, "=r,r,r,r,r,r", [words, shift, scale], dtype=tl.bfloat16, is_pure=True,
                                      pack=2)
    else:
        w = tl.inline_asm_elementwise(_PAIRS_F16, "=r,r,r,r,r,r", [words, shift, scale], dtype=tl.float16, is_pure=True,
                                      pack=2)
    return w


@jit
def _dequant_block(words, s_ptrs, kb, stride_sk, n_mask, S0: tl.constexpr, STACK: tl.constexpr, GROUP: tl.constexpr,
                   SUB_K: tl.constexpr, dtype: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_BIAS: tl.constexpr,
                   DEQ_PTX: tl.constexpr):
    """Sub-tiles S0 .. S0 + STACK - 1 of a packed block of words (SUB_K, BLOCK_N) -> their
    (STACK * SUB_K, BLOCK_N) weights in dtype, rows in input order: nibble s of word row j is
    input kb + s * SUB_K + j (the repack's layout), so stacking the unpacked sub-tiles along a
    leading axis and merging it with the rows gives inputs kb + S0 * SUB_K onwards, in order.
    s_ptrs (BLOCK_N,): the scale row of group 0 of this expert's columns."""
    s_idx = S0 + tl.arange(0, STACK)  # (STACK,)
    group = (kb + s_idx * SUB_K) // GROUP  # (STACK,) every sub-tile lies inside one group
    scale = tl.load(s_ptrs[None, None, :] + group[:, None, None] * stride_sk, mask=n_mask[None, None, :], other=0.0)
    w = _dequant(words[None, :, :], 4 * s_idx[:, None, None], scale, dtype, MAGIC_BITS, MAGIC_BIAS, DEQ_PTX)
    return tl.reshape(w, (STACK * SUB_K, w.shape[2]))  # (STACK * SUB_K, BLOCK_N)


@jit(do_not_specialize=("n_rows", "n_mblocks"))
def _moe_gemm_kernel(
    a_ptr,  # (a_rows, K) activations; row r of the grouped batch is a[src[r]] when GATHER
    src_ptr,  # (n_rows,) int, read only when GATHER
    counts_ptr,  # (E,) int rows per expert
    w0_ptr,  # dense (E, N, K) / int4 packed (E, K_pad/8, N): gate, or the only weight
    s0_ptr,  # int4 scale (E, K_pad/group, N)
    w1_ptr,  # up (GATED only), same strides as w0
    s1_ptr,
    as_ptr,  # A_FP8: activation scales (a_rows, K / FP8_BK) float32
    c_ptr,  # (n_rows, N) output, grouped order
    n_rows,
    n_mblocks,  # m-blocks in the grid (an upper bound of the real row blocks)
    num_experts,
    N,
    K,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,  # dense: along K; int4: per word row
    stride_wn,
    stride_se,
    stride_sk,
    stride_sn,
    stride_asm,
    stride_ask,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GATED: tl.constexpr,  # two weights, epilogue silu(acc0) * acc1
    GATHER: tl.constexpr,
    INT4: tl.constexpr,
    INT4_STACK: tl.constexpr,  # int4: sub-tiles stacked per dot (1, 2, 4 or 8 of a packed block's 8)
    GROUP: tl.constexpr,  # int4 group size
    SUB_K: tl.constexpr,  # int4: k_block // 8, inputs per unpacked sub-tile
    MAGIC_BITS: tl.constexpr,  # int4, 16-bit activations: the bits of MAGIC_BIAS - 8 (else 0)
    MAGIC_BIAS: tl.constexpr,
    DEQ_PTX: tl.constexpr,  # int4, 16-bit activations on sm_90+: dequantize in pairs with PTX
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K on the activations
    IEEE: tl.constexpr,
    FP8: tl.constexpr = False,  # e4m3 weights, s0/s1 = block scales (E, N blocks, K blocks)
    FP8_BN: tl.constexpr = 128,  # scale block along N
    FP8_BK: tl.constexpr = 128,  # scale block along K (a multiple of BLOCK_K)
    GROUP_M: tl.constexpr = 0,  # launch order: 0 = m fastest over all m-blocks, else groups of GROUP_M
    A_FP8: tl.constexpr = False,  # FP8 only: e4m3 activations with (row, K block) scales (W8A8)
    SPLIT_K: tl.constexpr = False,  # dense / FP8, not gated: grid axis 1 splits K, fp32 partials to c[split]
    k_split=0,  # SPLIT_K: inputs per split, a multiple of BLOCK_K (the count is the grid's, not compiled in)
    stride_cs=0,  # SPLIT_K: c's stride between splits
):
    pid = tl.program_id(0)
    if GROUP_M == 0:
        pid_m = pid % n_mblocks
        pid_n = pid // n_mblocks
    else:  # GROUP_M m-blocks x every n-block, then the next GROUP_M m-blocks
        width = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = (pid // width) * GROUP_M
        size_m = min(n_mblocks - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m

    # ---- which expert and rows this m-block covers, from the counts (no host table)
    e_idx = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + e_idx, mask=e_idx < num_experts, other=0).to(tl.int32)  # (BLOCK_E,)
    nblk = (cnt + BLOCK_M - 1) // BLOCK_M  # (BLOCK_E,) row blocks per expert
    blk_end = tl.cumsum(nblk, axis=0)  # (BLOCK_E,)
    if pid_m >= tl.sum(nblk, axis=0):
        return
    expert = tl.sum((blk_end <= pid_m).to(tl.int32), axis=0)
    mine = e_idx == expert
    row_end = tl.cumsum(cnt, axis=0)  # (BLOCK_E,)
    first_row = tl.sum(tl.where(mine, row_end - cnt, 0), axis=0)
    stop_row = tl.sum(tl.where(mine, row_end, 0), axis=0)
    first_blk = tl.sum(tl.where(mine, blk_end - nblk, 0), axis=0)

    offs_m = first_row + (pid_m - first_blk) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) grouped rows
    m_mask = (offs_m < stop_row) & (offs_m < n_rows)
    if GATHER:
        a_rows = tl.load(src_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    else:
        a_rows = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    n_mask = offs_n < N
    expert64 = expert.to(tl.int64)

    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_row_ptrs = a_ptr + a_rows[:, None] * stride_am  # (BLOCK_M, 1)
    dtype = a_ptr.dtype.element_ty

    if INT4:
        offs_j = tl.arange(0, SUB_K)  # (SUB_K,)
        w_off = expert64 * stride_we + offs_j[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (SUB_K, BLOCK_N)
        s_off = expert64 * stride_se + offs_n * stride_sn  # (BLOCK_N,)
        # The weights are padded to a whole number of k_blocks: only N needs a mask.
        for k0 in range(0, K, BLOCK_K):
            for c in tl.static_range(BLOCK_K // (8 * SUB_K)):
                kb = k0 + c * (8 * SUB_K)  # first input of this packed block
                words0 = tl.load(w0_ptr + w_off + (kb // 8) * stride_wk, mask=n_mask[None, :], other=0)
                if GATED:
                    words1 = tl.load(w1_ptr + w_off + (kb // 8) * stride_wk, mask=n_mask[None, :], other=0)
                # INT4_STACK sub-tiles unpacked into one (INT4_STACK * SUB_K, BLOCK_N) tile per dot
                for c2 in tl.static_range(0 if INT4_STACK == 1 else 8 // INT4_STACK):
                    offs_k = kb + c2 * INT4_STACK * SUB_K + tl.arange(0, INT4_STACK * SUB_K)  # (STACK * SUB_K,)
                    a_ptrs = a_row_ptrs + offs_k[None, :] * stride_ak  # (BLOCK_M, STACK * SUB_K)
                    if EVEN_K:
                        a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
                    else:
                        a = tl.load(a_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
                    b0 = _dequant_block(words0, s0_ptr + s_off, kb, stride_sk, n_mask, c2 * INT4_STACK, INT4_STACK,
                                        GROUP, SUB_K, dtype, MAGIC_BITS, MAGIC_BIAS, DEQ_PTX)
                    acc0 = _mma(a, b0, acc0, IEEE)
                    if GATED:
                        b1 = _dequant_block(words1, s1_ptr + s_off, kb, stride_sk, n_mask, c2 * INT4_STACK, INT4_STACK,
                                            GROUP, SUB_K, dtype, MAGIC_BITS, MAGIC_BIAS, DEQ_PTX)
                        acc1 = _mma(a, b1, acc1, IEEE)
                for s in tl.static_range(8 if INT4_STACK == 1 else 0):  # one sub-tile per dot
                    ks = kb + s * SUB_K  # inputs [ks, ks + SUB_K): one sub-tile, inside one group
                    offs_k = ks + offs_j
                    a_ptrs = a_row_ptrs + offs_k[None, :] * stride_ak  # (BLOCK_M, SUB_K)
                    if EVEN_K:
                        a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
                    else:
                        a = tl.load(a_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
                    sc0 = tl.load(s0_ptr + s_off + (ks // GROUP) * stride_sk, mask=n_mask, other=0.0)
                    shift = tl.full((1, 1), 4 * s, tl.int32)  # nibble s
                    b0 = _dequant(words0, shift, sc0[None, :], dtype, MAGIC_BITS, MAGIC_BIAS, DEQ_PTX)  # (SUB_K, BLOCK_N)
                    acc0 = _mma(a, b0, acc0, IEEE)
                    if GATED:
                        sc1 = tl.load(s1_ptr + s_off + (ks // GROUP) * stride_sk, mask=n_mask, other=0.0)
                        b1 = _dequant(words1, shift, sc1[None, :], dtype, MAGIC_BITS, MAGIC_BIAS, DEQ_PTX)
                        acc1 = _mma(a, b1, acc1, IEEE)
    else:
        k_lo = 0
        k_hi = K
        if SPLIT_K:  # this program's share of K: [k_lo, k_hi), whole BLOCK_K steps but the last of K
            k_lo = tl.program_id(1) * k_split
            k_hi = tl.minimum(K, k_lo + k_split)
            c_ptr += tl.program_id(1).to(tl.int64) * stride_cs
        offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        a_ptrs = a_row_ptrs + (k_lo + offs_k)[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
        w_off = expert64 * stride_we + (k_lo + offs_k)[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BLOCK_K, BLOCK_N)
        w0_ptrs = w0_ptr + w_off
        w1_ptrs = w1_ptr + w_off
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
                b0 = tl.load(w0_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = offs_k < K - k0
                a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                b0 = tl.load(w0_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if FP8:  # one scale per (N block, K block): applied to this tile's fp32 partial product
                s_ptrs = expert64 * stride_se + (k0 // FP8_BK) * stride_sk + (offs_n // FP8_BN) * stride_sn
                sc0 = tl.load(s0_ptr + s_ptrs, mask=n_mask, other=0.0)  # (BLOCK_N,)
                if A_FP8:  # e4m3 x e4m3 on the tensor cores, both scales on the fp32 partial product
                    a_sc = tl.load(as_ptr + a_rows * stride_asm + (k0 // FP8_BK) * stride_ask, mask=m_mask, other=0.0)
                    acc0 += tl.dot(a, b0) * (a_sc[:, None] * sc0[None, :])
                else:
                    acc0 += _mma(a, b0.to(dtype), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE) * sc0[None, :]
            else:
                acc0 = _mma(a, b0.to(dtype), acc0, IEEE)
            if GATED:
                if EVEN_K:
                    b1 = tl.load(w1_ptrs, mask=n_mask[None, :], other=0.0)
                else:
                    b1 = tl.load(w1_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                if FP8:
                    sc1 = tl.load(s1_ptr + s_ptrs, mask=n_mask, other=0.0)
                    if A_FP8:
                        acc1 += tl.dot(a, b1) * (a_sc[:, None] * sc1[None, :])
                    else:
                        acc1 += _mma(a, b1.to(dtype), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE) * sc1[None, :]
                else:
                    acc1 = _mma(a, b1.to(dtype), acc1, IEEE)
            a_ptrs += BLOCK_K * stride_ak
            w0_ptrs += BLOCK_K * stride_wk
            w1_ptrs += BLOCK_K * stride_wk

    if GATED:
        res = acc0 * tl.sigmoid(acc0) * acc1  # silu(gate) * up, fp32
    else:
        res = acc0
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, res.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@jit
def _combine_kernel(
    y_ptr,  # (T*k, H) expert outputs, grouped order
    slot_row_ptr,  # (T*k,) int: row of y holding token t's slot j, at t*k + j
    weight_ptr,  # (T*k,) fp32 routing weights, at t*k + j
    out_ptr,  # (T, H)
    H,
    stride_ym,
    stride_om,
    TOPK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    mask = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(slot_row_ptr + t * TOPK + j).to(tl.int64)
        wt = tl.load(weight_ptr + t * TOPK + j).to(tl.float32)
        y = tl.load(y_ptr + row * stride_ym + offs, mask=mask, other=0.0)
        acc += wt * y.to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (then they run on CPU tensors)."""
    return triton is not None and type(_moe_gemm_kernel).__name__ == "InterpretedFunction"


def _ptx_dequant_ok(a: torch.Tensor) -> bool:
    """INT4 pairs dequantized with inline PTX (`_dequant_pairs`): compiled for a GPU (not the
    interpreter) of sm_90 or later (packed bf16 arithmetic)."""
    return a.is_cuda and torch.version.hip is None and not _interpreted() and cuda_capability(a.device) >= (9, 0)


def uses_triton(t: torch.Tensor) -> bool:
    """Whether the launchers run the Triton kernels for tensors like `t` (else the references)."""
    return triton is not None and (t.is_cuda or (t.device.type == "cpu" and _interpreted()))


def grouped_mlp(
    x: torch.Tensor,
    counts: torch.Tensor | Sequence[int],
    weights: ExpertWeights,
    *,
    src_rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    gate_up_tiles: TileConfig | None = None,
    down_tiles: TileConfig | None = None,
    fp8_activations: bool | None = None,
) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) per row, rows grouped by local expert -> (rows, H).

    x (rows, H), or with `src_rows` (rows,) any (tokens, H) with grouped row r = x[src_rows[r]].
    counts (E,) int on x's device (a list is copied there): rows per expert in order; they must
    sum to rows (not checked: that would sync). Rows past sum(counts) are left unwritten.
    `out` (rows, H) in x's dtype is written in place and returned. Tiles default to
    `default_tiles(rows, weights, x.dtype)`; either kernel's can be given (autotuning). bf16
    `DenseExperts` at prefill sizes on Hopper run torch's grouped GEMM instead
    (`grouped_mm_mlp`), unless tiles or `out` are given.
    fp8_activations (FP8 weights only): W8A8, x and h quantized to e4m3 per (row, block_in group)
    before each GEMM; None picks it by `w8a8_experts_default` (prefill-sized batches, or any
    inside `w8a16_only(experts_w8a8=True)`).
    """
    if not isinstance(weights, (DenseExperts, Int4Experts, Fp8Experts)):
        raise TypeError(f"grouped_mlp: weights must be DenseExperts, Int4Experts or Fp8Experts, got {type(weights).__name__}")
    if x.ndim != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"grouped_mlp: x must be (rows, H) bf16/fp16/fp32, got {x.dtype} {tuple(x.shape)}")
    e, h, i = weights.num_experts, weights.hidden, weights.intermediate
    if x.shape[1] != h:
        raise ValueError(f"grouped_mlp: x has {x.shape[1]} features, the experts take H={h}")
    if weights.device != x.device:
        raise ValueError(f"grouped_mlp: x on {x.device}, weights on {weights.device}")
    if not isinstance(counts, torch.Tensor):
        counts = torch.tensor(list(counts), dtype=torch.int32, device=x.device)
    if counts.ndim != 1 or counts.shape[0] != e or counts.is_floating_point() or counts.dtype == torch.bool:
        raise ValueError(f"grouped_mlp: counts must be an int tensor of shape ({e},), got {_desc(counts)}")
    if counts.device != x.device:
        raise ValueError(f"grouped_mlp: counts on {counts.device}, x on {x.device}")
    if src_rows is not None:
        if src_rows.ndim != 1 or src_rows.is_floating_point() or src_rows.device != x.device:
            raise ValueError(f"grouped_mlp: src_rows must be a 1-D int tensor on {x.device}, got {_desc(src_rows)}")
        rows = src_rows.shape[0]
    else:
        rows = x.shape[0]
    own_out = out is None
    if out is None:
        out = torch.empty((rows, h), dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (rows, h) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"grouped_mlp: out must be {x.dtype} {(rows, h)} on {x.device}, "
            f"got {_desc(out)} on {out.device}"
        )
    fp8 = isinstance(weights, Fp8Experts)
    w8a8 = fp8 and w8a8_experts_default(rows / e, x, block_in=weights.block[1]) if fp8_activations is None else fp8_activations
    if w8a8 and not fp8:
        raise ValueError(f"grouped_mlp: fp8_activations needs Fp8Experts, got {type(weights).__name__}")
    if w8a8:
        check_w8a8_block("grouped_mlp", weights.block[1])
    if rows == 0:
        return out
    if not uses_triton(x):
        return grouped_mlp_reference(x, counts, weights, src_rows=src_rows, out=out, fp8_activations=w8a8)
    if (isinstance(weights, DenseExperts) and own_out and gate_up_tiles is None and down_tiles is None
            and grouped_mm_mlp.supported(x, weights, rows)):  # prefill sizes: torch's grouped GEMM
        return grouped_mm_mlp.grouped_mlp(x, src_rows, counts, weights)

    gu_default, dn_default = default_tiles(rows, weights, x.dtype, fp8_activations=w8a8)
    h_buf = torch.empty((rows, i), dtype=x.dtype, device=x.device)  # (rows, I)
    group = weights.block[1] if w8a8 else 0
    a, a_scale = quantize_fp8_groups(x, group) if w8a8 else (x, None)  # (tokens, H) e4m3, (tokens, H / group)
    # INT4 on Hopper with default tiles: the Gluon kernel (kernels/int4_wgmma.py); else Triton
    gluon = isinstance(weights, Int4Experts) and _ptx_dequant_ok(a)
    magic = _MAGIC.get(a.dtype, (0, 0.0))[0]
    if not (gluon and gate_up_tiles is None and int4_wgmma.grouped_gemm(a, src_rows, counts, weights, True, h_buf, magic)):
        _launch_gemm(a, a_scale, src_rows, counts, weights, "gate_up", h_buf, rows, i, h, gate_up_tiles or gu_default)
    a, a_scale = quantize_fp8_groups(h_buf, group) if w8a8 else (h_buf, None)  # (rows, I), (rows, I / group)
    if not (gluon and down_tiles is None and int4_wgmma.grouped_gemm(a, None, counts, weights, False, out, magic)):
        _launch_gemm(a, a_scale, None, counts, weights, "down", out, rows, h, i, down_tiles or dn_default)
    return out


def _launch_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    src_rows: torch.Tensor | None,
    counts: torch.Tensor,
    weights: ExpertWeights,
    which: str,
    c: torch.Tensor,
    rows: int,
    n: int,
    k: int,
    tiles: TileConfig,
) -> None:
    gated = which == "gate_up"
    bm, bn = tiles.block_m, tiles.block_n
    for name, v in (("block_m", bm), ("block_n", bn)):
        if v < _MIN_DOT or v & (v - 1):
            raise ValueError(f"grouped_mlp {which}: {name} must be a power of two >= {_MIN_DOT}, got {v}")
    e = weights.num_experts
    n_mblocks = (rows + min(e, rows) * (bm - 1)) // bm  # >= sum over experts of cdiv(count, bm)
    if isinstance(weights, DenseExperts):
        w0, w1 = (weights.gate, weights.up) if gated else (weights.down, weights.down)
        s0 = s1 = w0  # unused
        bk = tiles.block_k or 64
        if bk < _MIN_DOT or bk & (bk - 1):
            raise ValueError(f"grouped_mlp {which}: block_k must be a power of two >= {_MIN_DOT}, got {bk}")
        strides_w = (w0.stride(0), w0.stride(2), w0.stride(1))  # (expert, k, n)
        strides_s = (0, 0, 0)
        int4, group, sub_k = False, 1, _MIN_DOT
        magic_bits, magic_bias = 0, 0.0
        fp8, fp8_bn, fp8_bk = False, 128, 128
    elif isinstance(weights, Fp8Experts):
        w0, w1 = (weights.gate, weights.up) if gated else (weights.down, weights.down)
        s0, s1 = (weights.gate_scale, weights.up_scale) if gated else (weights.down_scale, weights.down_scale)
        fp8, (fp8_bn, fp8_bk) = True, weights.block
        bk = min(tiles.block_k or 64, fp8_bk)
        if bk < _MIN_DOT or bk & (bk - 1) or fp8_bk % bk:
            raise ValueError(f"grouped_mlp {which}: FP8 block_k must be a power of two >= {_MIN_DOT} dividing {fp8_bk}, got {bk}")
        strides_w = (w0.stride(0), w0.stride(2), w0.stride(1))  # (expert, k, n)
        strides_s = (s0.stride(0), s0.stride(2), s0.stride(1))  # (expert, k block, n block)
        int4, group, sub_k = False, 1, _MIN_DOT
        magic_bits, magic_bias = 0, 0.0
    else:
        q0, q1 = (weights.gate, weights.up) if gated else (weights.down, weights.down)
        w0, w1, s0, s1 = q0.packed, q1.packed, q0.scale, q1.scale
        bk = tiles.block_k or q0.k_block
        k_pad = w0.shape[1] * 8
        if bk % q0.k_block or k_pad % bk:
            raise ValueError(
                f"grouped_mlp {which}: INT4 block_k={bk} must be a multiple of the repack's k_block={q0.k_block} "
                f"and divide the padded K={k_pad}"
            )
        strides_w = (w0.stride(0), w0.stride(1), w0.stride(2))
        strides_s = (s0.stride(0), s0.stride(1), s0.stride(2))
        int4, group, sub_k = True, q0.group_size, q0.k_block // 8
        # 16-bit activations: nibble | magic is the bit pattern of (bias + nibble), exactly
        # representable, so dequantizing needs no int->float conversion (module docstring).
        magic_bits, magic_bias = _MAGIC.get(a.dtype, (0, 0.0))
        fp8, fp8_bn, fp8_bk = False, 128, 128
    if int4 and tiles.int4_stack not in (1, 2, 4, 8):
        raise ValueError(f"grouped_mlp {which}: int4_stack must be 1, 2, 4 or 8 sub-tiles per dot, got {tiles.int4_stack}")
    deq_ptx = int4 and magic_bits != 0 and tiles.int4_ptx and _ptx_dequant_ok(a)
    if tiles.group_m < 0:
        raise ValueError(f"grouped_mlp {which}: group_m must be >= 0, got {tiles.group_m}")
    if tiles.split_k > 1:
        raise ValueError(f"grouped_mlp {which}: split_k is fp8_linear's (the expert GEMMs do not split K), got {tiles.split_k}")
    if a_scale is not None and not fp8:
        raise ValueError(f"grouped_mlp {which}: FP8 activations need FP8 weights")
    _moe_gemm_kernel[(n_mblocks * triton.cdiv(n, bn),)](
        a, src_rows if src_rows is not None else counts, counts,
        w0, s0, w1, s1, a_scale if a_scale is not None else counts, c,
        rows, n_mblocks, e, n, k,
        a.stride(0), a.stride(1),
        *strides_w, *strides_s,
        *(a_scale.stride() if a_scale is not None else (0, 0)),
        c.stride(0), c.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=max(2, triton.next_power_of_2(e)),
        GATED=gated, GATHER=src_rows is not None, INT4=int4, INT4_STACK=tiles.int4_stack if int4 else 1, GROUP=group, SUB_K=sub_k,
        MAGIC_BITS=magic_bits, MAGIC_BIAS=magic_bias, DEQ_PTX=deq_ptx,
        EVEN_K=(k % bk == 0), IEEE=(a.dtype == torch.float32), FP8=fp8, FP8_BN=fp8_bn, FP8_BK=fp8_bk,
        GROUP_M=tiles.group_m, A_FP8=a_scale is not None, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    *,
    tiles: TileConfig | None = None,
    fp8_activations: bool | None = None,
) -> torch.Tensor:
    """x (rows, K) @ W^T with W = e4m3 weight (N, K) x its (ceil(N/bo), ceil(K/bi)) block scales
    -> (rows, N) in x's dtype: the GEMM for DeepSeek-V3's dense FP8 layers (attention
    projections, dense MLPs, shared experts), the MoE GEMM kernel with one expert. W8A16, or W8A8
    (x quantized per (row, bi group)) when fp8_activations, None = `w8a8_linear_default(rows)`."""
    if x.ndim != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"fp8_linear: x must be (rows, K) bf16/fp16/fp32, got {_desc(x)}")
    n, k = weight.shape
    bo, bi = block
    if weight.dtype != torch.float8_e4m3fn or x.shape[1] != k:
        raise ValueError(f"fp8_linear: weight must be float8_e4m3fn (N, {x.shape[1]}), got {_desc(weight)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (-(-n // bo), -(-k // bi)):
        raise ValueError(f"fp8_linear: scale must be float32 {(-(-n // bo), -(-k // bi))}, got {_desc(scale)}")
    rows = x.shape[0]
    w8a8 = w8a8_linear_default(rows, x, block_in=bi) if fp8_activations is None else fp8_activations
    if w8a8:
        check_w8a8_block("fp8_linear", bi)
    if tiles is not None and tiles.split_k < 0:
        raise ValueError(f"fp8_linear: split_k must be >= 0 (0 = chosen by the grid), got {tiles.split_k}")
    if rows == 0 or not uses_triton(x):
        if w8a8:
            return (fp8_round_trip(x, bi) @ dequantize_fp8(weight, scale, block, torch.float32).T).to(x.dtype)
        return x @ dequantize_fp8(weight, scale, block, x.dtype).T
    waves = 0.0  # split K only where the tiles say (up to 64 rows, where it was measured)
    if tiles is None and w8a8:
        tiles, waves = w8a8_linear_tiles(rows)
    elif tiles is None:
        tiles, waves = linear_tiles(rows)
        if x.dtype == torch.float32:
            tiles = fp32_tiles(tiles, False)
    bm, bn = tiles.block_m, tiles.block_n
    bk = min(tiles.block_k or 64, bi)
    if bk < _MIN_DOT or bk & (bk - 1) or bi % bk:
        raise ValueError(f"fp8_linear: block_k must be a power of two >= {_MIN_DOT} dividing {bi}, got {bk}")
    counts = torch.full((1,), rows, dtype=torch.int32, device=x.device)
    n_mblocks = triton.cdiv(rows, bm)
    programs = n_mblocks * triton.cdiv(n, bn)
    k_steps = triton.cdiv(k, bk)
    short_k = W8A8_SHORT_K_STEPS if w8a8 else 0
    split = tiles.split_k or (linear_split_k(programs, k_steps, cuda_sm_count(x.device), waves, short_k=short_k)
                              if x.is_cuda and waves else 1)
    k_split = triton.cdiv(k_steps, min(split, k_steps)) * bk  # whole K steps per split
    split = triton.cdiv(k, k_split)  # none empty
    # One split writes the output; several write fp32 partials (split, rows, N), added after.
    out = (torch.empty((rows, n), dtype=x.dtype, device=x.device) if split == 1
           else torch.empty((split, rows, n), dtype=torch.float32, device=x.device))
    a, a_scale = quantize_fp8_groups(x, bi) if w8a8 else (x, None)  # (rows, K) e4m3, (rows, K / bi)
    _moe_gemm_kernel[(programs, split)](
        a, counts, counts, weight, scale, weight, scale, a_scale if w8a8 else counts, out,
        rows, n_mblocks, 1, n, k,
        a.stride(0), a.stride(1),
        0, weight.stride(1), weight.stride(0),
        0, scale.stride(1), scale.stride(0),
        *(a_scale.stride() if w8a8 else (0, 0)),
        out.stride(-2), out.stride(-1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=2,
        GATED=False, GATHER=False, INT4=False, INT4_STACK=1, GROUP=1, SUB_K=_MIN_DOT, MAGIC_BITS=0, MAGIC_BIAS=0.0, DEQ_PTX=False,
        EVEN_K=(k % bk == 0), IEEE=(x.dtype == torch.float32), FP8=True, FP8_BN=bo, FP8_BK=bi,
        GROUP_M=tiles.group_m, A_FP8=w8a8, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        SPLIT_K=split > 1, k_split=k_split, stride_cs=out.stride(0) if split > 1 else 0,
    )  # fmt: skip
    if split == 1:
        return out
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(rows * n, block),)](out, y, rows * n, split, out.stride(0), BLOCK=block)
    return y


@jit(do_not_specialize=("n_elem",))
def _sum_splits_kernel(p_ptr, y_ptr, n_elem, split, stride_s, BLOCK: tl.constexpr):
    """y = sum over the split axis of fp32 partials p (split, n_elem), rounded once to y's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elem
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = p_ptr + offs  # advanced split by split: 64-bit pointer arithmetic, no int32 product
    for _ in range(split):
        acc += tl.load(ptrs, mask=inside, other=0.0)
        ptrs += stride_s
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=inside)


def fused_moe(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: ExpertWeights,
    *,
    out: torch.Tensor | None = None,
    gate_up_tiles: TileConfig | None = None,
    down_tiles: TileConfig | None = None,
    fp8_activations: bool | None = None,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t])  -> (T, H) in hidden's dtype.

    hidden (T, H); topk_ids (T, k) int in [0, E) (not checked: that would sync); topk_weights
    (T, k) float. The combine accumulates in fp32.
    """
    if hidden.ndim != 2 or hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"fused_moe: hidden must be (T, H) bf16/fp16/fp32, got {hidden.dtype} {tuple(hidden.shape)}")
    if topk_ids.ndim != 2 or topk_ids.shape[0] != hidden.shape[0] or topk_ids.is_floating_point():
        raise ValueError(f"fused_moe: topk_ids must be int (T, k) with T={hidden.shape[0]}, got {_desc(topk_ids)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or not topk_weights.is_floating_point():
        raise ValueError(f"fused_moe: topk_weights must be float {tuple(topk_ids.shape)}, got {_desc(topk_weights)}")
    if not (hidden.device == topk_ids.device == topk_weights.device == weights.device):
        raise ValueError("fused_moe: hidden, topk_ids, topk_weights and weights must share a device")
    t, k = topk_ids.shape
    if out is None:
        out = torch.empty_like(hidden)
    elif tuple(out.shape) != tuple(hidden.shape) or out.dtype != hidden.dtype or out.device != hidden.device:
        raise ValueError(f"fused_moe: out must be {hidden.dtype} {tuple(hidden.shape)}, got {_desc(out)}")
    if t == 0:
        return out
    if fp8_activations is None:  # decided here so the CPU path and the kernels agree
        fp8_activations = isinstance(weights, Fp8Experts) and w8a8_experts_default(
            t * k / weights.num_experts, hidden, block_in=weights.block[1])
    if not uses_triton(hidden):
        out.copy_(fused_moe_reference(hidden, topk_ids, topk_weights, weights, fp8_activations=fp8_activations))
        return out

    e = weights.num_experts
    flat = topk_ids.reshape(-1)  # (T*k,) slot t*k + j
    order = torch.argsort(flat, stable=True)  # (T*k,) grouped row -> slot
    counts = torch.zeros(e, dtype=torch.int32, device=hidden.device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int32))  # (E,), no sync unlike bincount
    y = grouped_mlp(
        hidden, counts, weights, src_rows=order // k,
        gate_up_tiles=gate_up_tiles, down_tiles=down_tiles, fp8_activations=fp8_activations,
    )  # (T*k, H) grouped  # fmt: skip
    slot_row = torch.empty_like(order)
    slot_row.scatter_(0, order, torch.arange(order.numel(), device=order.device))  # (T*k,) slot -> grouped row
    w = topk_weights.reshape(-1).to(torch.float32).contiguous()  # (T*k,)
    block_h = min(1024, triton.next_power_of_2(hidden.shape[1]))
    _combine_kernel[(t, triton.cdiv(hidden.shape[1], block_h))](
        y, slot_row, w, out, hidden.shape[1], y.stride(0), out.stride(0), TOPK=k, BLOCK_H=block_h, num_warps=4
    )
    return out


__all__ = [
    "DenseExperts",
    "ExpertWeights",
    "Fp8Experts",
    "dequantize_fp8",
    "fp8_linear",
    "Int4Experts",
    "Int4Weight",
    "TileConfig",
    "W8A8_DECODE_LINEAR_MIN_ROWS",
    "W8A8_LINEAR_MIN_ROWS",
    "W8A8_MIN_ROWS",
    "default_tiles",
    "dequantize_int4",
    "expert_weights_dense",
    "fused_moe",
    "fused_moe_reference",
    "grouped_mlp",
    "grouped_mlp_reference",
    "repack_int4",
    "unrepack_int4",
    "uses_triton",
    "w8a8_default",
    "w8a8_experts_default",
    "w8a8_linear_default",
    "w8a8_tiles",
    "w8a16_only",
]
