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
from moecluster.kernels.fp8_linear import fp8_linear
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
    fused_moe_reference,
    grouped_mlp_reference,
)
from moecluster.kernels.jit import uses_triton
from moecluster.kernels.moe_gemm import (  # noqa: F401 - _MAGIC, _moe_gemm_kernel: scripts and tests reach them here
    _MAGIC,
    _combine_kernel,
    _moe_gemm_kernel,
    _ptx_dequant_ok,
    triton,
)
from moecluster.kernels.moe_tiles import TileConfig, default_tiles, w8a8_tiles
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
