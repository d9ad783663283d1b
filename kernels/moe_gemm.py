"""The fused MoE's Triton kernels (the launchers are kernels/fused_moe.py's `grouped_mlp` and
`fused_moe`, and kernels/fp8_linear.py's `fp8_linear`): `_moe_gemm_kernel`, one grouped GEMM over
rows grouped by expert (gated gate_up with SiLU-and-mul, or down; bf16, FP8 W8A16 / W8A8, INT4
dequantized in registers; split K for the dense FP8 linears), and `_combine_kernel`, the weighted
sum of each token's top-k rows in fp32. kernels/fused_moe.py's docstring describes the grid, the
tiles and the weight formats.
"""

from __future__ import annotations

import torch

from moecluster.kernels.device import cuda_capability
from moecluster.kernels.jit import interpreted, jit, uses_triton  # noqa: F401 - uses_triton: fused_moe's callers

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


def _ptx_dequant_ok(a: torch.Tensor) -> bool:
    """INT4 pairs dequantized with inline PTX (`_dequant_pairs`): compiled for a GPU (not the
    interpreter) of sm_90 or later (packed bf16 arithmetic)."""
    return a.is_cuda and torch.version.hip is None and not interpreted() and cuda_capability(a.device) >= (9, 0)
