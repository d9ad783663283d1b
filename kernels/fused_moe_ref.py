"""Torch references of the fused MoE kernels (kernels/fused_moe.py), and their CPU path: loops
over experts with the weights dequantized, products in fp32, rounding where the kernels round
(h and the expert outputs in the activation dtype). With `fp8_activations` the activations are
quantized to e4m3 in groups of the weights' block_in before each GEMM, as the W8A8 kernels do."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from moecluster.kernels.fp8_quant import dequantize_fp8_groups, quantize_fp8_groups_reference
from moecluster.kernels.moe_weights import (
    DenseExperts,
    ExpertWeights,
    Fp8Experts,
    Int4Weight,
    dequantize_fp8,
    dequantize_int4,
)


def expert_weights_dense(weights: ExpertWeights, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate (E, I, H), up (E, I, H), down (E, H, I)) in dtype, dequantized if INT4."""
    if isinstance(weights, DenseExperts):
        return weights.gate.to(dtype), weights.up.to(dtype), weights.down.to(dtype)
    if isinstance(weights, Fp8Experts):
        return tuple(dequantize_fp8(w, sc, weights.block, dtype) for w, sc in  # type: ignore[return-value]
                     ((weights.gate, weights.gate_scale), (weights.up, weights.up_scale), (weights.down, weights.down_scale)))
    gate, up, down = (dequantize_int4(w, dtype) for w in (weights.gate, weights.up, weights.down))
    return gate, up, down


def fp8_round_trip(x: torch.Tensor, group: int) -> torch.Tensor:
    """x through the W8A8 kernels' activation quantization, back in fp32 (rows, K)."""
    return dequantize_fp8_groups(*quantize_fp8_groups_reference(x, group), group, torch.float32)


def _expert_mlp(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_group: int | None = None
) -> torch.Tensor:
    """x (rows, H) through one expert in fp32, rounding h and the result to x's dtype -> (rows, H);
    with act_group, x and h quantized to e4m3 in groups of act_group first (W8A8)."""
    xf = x.float() if act_group is None else fp8_round_trip(x, act_group)
    g = xf @ gate.float().T  # (rows, I)
    u = xf @ up.float().T  # (rows, I)
    hid = (F.silu(g) * u).to(x.dtype)  # (rows, I)
    hf = hid.float() if act_group is None else fp8_round_trip(hid, act_group)
    return (hf @ down.float().T).to(x.dtype)  # (rows, H)


def grouped_mlp_reference(
    x: torch.Tensor,
    counts: torch.Tensor | Sequence[int],
    weights: ExpertWeights,
    *,
    src_rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    fp8_activations: bool = False,
) -> torch.Tensor:
    """Per-expert loop with the weights in x's dtype (dequantized for INT4); same contract as
    grouped_mlp (fp8_activations: FP8 weights only, the activations quantized as W8A8 does)."""
    if fp8_activations and not isinstance(weights, Fp8Experts):
        raise ValueError(f"grouped_mlp: fp8_activations needs Fp8Experts, got {type(weights).__name__}")
    act_group = weights.block[1] if fp8_activations else None
    rows_x = x if src_rows is None else x[src_rows.long()]  # (rows, H)
    if out is None:
        out = torch.empty_like(rows_x)
    counts_list = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    start = 0
    for e, c in enumerate(counts_list):
        c = min(int(c), rows_x.shape[0] - start)
        if c > 0:
            gate, up, down = _one_expert(weights, e, x.dtype)
            out[start : start + c] = _expert_mlp(rows_x[start : start + c], gate, up, down, act_group)
            start += c
    return out


def _one_expert(weights: ExpertWeights, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(weights, DenseExperts):
        return weights.gate[e].to(dtype), weights.up[e].to(dtype), weights.down[e].to(dtype)
    if isinstance(weights, Fp8Experts):
        return tuple(dequantize_fp8(w[e], sc[e], weights.block, dtype) for w, sc in  # type: ignore[return-value]
                     ((weights.gate, weights.gate_scale), (weights.up, weights.up_scale), (weights.down, weights.down_scale)))
    picked = (_select(w, e) for w in (weights.gate, weights.up, weights.down))
    return tuple(dequantize_int4(w, dtype)[0] for w in picked)  # type: ignore[return-value]


def _select(w: Int4Weight, e: int) -> Int4Weight:
    return Int4Weight(w.packed[e : e + 1], w.scale[e : e + 1], w.in_features, w.group_size, w.k_block)


def fused_moe_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: ExpertWeights,
    fp8_activations: bool = False,
) -> torch.Tensor:
    """Per-expert loop over the tokens routed to it; expert outputs rounded to hidden's dtype,
    weighted sum in fp32 -> (T, H) in hidden's dtype (fp8_activations: FP8 weights, W8A8)."""
    if fp8_activations and not isinstance(weights, Fp8Experts):
        raise ValueError(f"fused_moe: fp8_activations needs Fp8Experts, got {type(weights).__name__}")
    act_group = weights.block[1] if fp8_activations else None
    acc = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # (T, H)
    ids = topk_ids.long()
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)  # (n,), (n,)
        y = _expert_mlp(hidden[tok], *_one_expert(weights, e, hidden.dtype), act_group)  # (n, H)
        acc.index_add_(0, tok, y.float() * topk_weights[tok, slot].float()[:, None])
    return acc.to(hidden.dtype)


