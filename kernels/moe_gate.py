"""The noaux_tc gate fused into one kernel: sigmoid, correction bias, group-limited top-k.

One program per token holds its whole row of router logits (256 experts for DeepSeek-V3 / K2)
in registers: scores = sigmoid(logits); biased = scores + bias; each group's score is the sum of
its two best biased scores; the best `topk_group` groups are kept (repeated argmax over the group
scores); the top-k experts inside them are picked by repeated argmax; the weights are the
unbiased scores of the picked experts, renormalised when asked, times the routing scale. The
semantics are those of `moecluster.router.experts.gate.select_experts` (the reference and the
CPU path); exact ties between experts may be broken differently (lowest index here).
"""

from __future__ import annotations

import torch

from moecluster.kernels.jit import jit, uses_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is the whole implementation
    triton = None
    tl = None


@jit
def _gate_kernel(
    logits_ptr,  # (tokens, E) any float
    bias_ptr,  # (E,) float
    weights_ptr,  # (tokens, TOP_K) float32 out
    ids_ptr,  # (tokens, TOP_K) int64 out
    stride_l,
    scale,
    E: tl.constexpr,
    E_PAD: tl.constexpr,  # E rounded up to a power of two (tl.arange); lanes past E never win
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    G: tl.constexpr = E // N_GROUP  # experts per group
    offs = tl.arange(0, E_PAD)  # (E_PAD,)
    real = offs < E
    logits = tl.load(logits_ptr + t * stride_l + offs, mask=real, other=0.0).to(tl.float32)
    scores = tl.sigmoid(logits)  # (E_PAD,)
    neg = float("-inf")
    biased = tl.where(real, scores + tl.load(bias_ptr + offs, mask=real, other=0.0).to(tl.float32), neg)
    if TOPK_GROUP < N_GROUP:
        grouped = tl.reshape(biased, (N_GROUP, G))  # (N_GROUP, G)
        best = tl.max(grouped, axis=1)  # (N_GROUP,)
        first = tl.argmax(grouped, axis=1)  # (N_GROUP,)
        cols = tl.arange(0, G)[None, :]
        second = tl.max(tl.where(cols == first[:, None], neg, grouped), axis=1)
        gscore = best + second  # (N_GROUP,)
        goffs = tl.arange(0, N_GROUP)
        keep = tl.zeros((N_GROUP,), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            g = tl.argmax(gscore, axis=0)
            keep = keep | (goffs == g)
            gscore = tl.where(goffs == g, neg, gscore)
        keep_e = tl.reshape(tl.broadcast_to(keep[:, None], (N_GROUP, G)), (E,))
        biased = tl.where(keep_e, biased, neg)
    koffs = tl.arange(0, TOP_K)
    ids = tl.zeros((TOP_K,), dtype=tl.int64)
    w = tl.zeros((TOP_K,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.argmax(biased, axis=0)
        ids = tl.where(koffs == j, e.to(tl.int64), ids)
        w = tl.where(koffs == j, tl.sum(tl.where(offs == e, scores, 0.0), axis=0), w)
        biased = tl.where(offs == e, neg, biased)
    if NORM:
        w = w / (tl.sum(w, axis=0) + 1e-20)
    tl.store(weights_ptr + t * TOP_K + koffs, w * scale)
    tl.store(ids_ptr + t * TOP_K + koffs, ids)


def _pow2(v: int) -> bool:
    return v > 0 and not v & (v - 1)


def fusable(num_experts: int, top_k: int, n_group: int, topk_group: int) -> bool:
    """Whether the kernel takes this gate (the model falls back to the torch path otherwise)."""
    return _pow2(top_k) and _pow2(n_group) and (_pow2(num_experts) or topk_group >= n_group)


def fused_select_experts(
    logits: torch.Tensor, bias: torch.Tensor, num_experts: int, top_k: int, n_group: int, topk_group: int,
    norm_topk_prob: bool, routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (tokens, E), bias (E,) -> weights (tokens, top_k) float32, ids (tokens, top_k) int64.
    top_k and n_group must be powers of two; E too when groups are limited (DeepSeek-V3: 256
    experts, 8 groups, top 4 groups), any E without group limiting (Kimi K2: 384 experts, one
    group): the kernel pads the row to a power of two."""
    tokens, e = logits.shape
    if e != num_experts or bias.shape != (e,):
        raise ValueError(f"fused_select_experts: logits (tokens, {num_experts}) and bias ({num_experts},), "
                         f"got {tuple(logits.shape)} and {tuple(bias.shape)}")
    if not fusable(e, top_k, n_group, topk_group):
        raise ValueError(f"fused_select_experts: top_k={top_k} and n_group={n_group} must be powers of two, and "
                         f"num_experts={e} too when topk_group={topk_group} < n_group")
    if e % n_group or not 0 < topk_group <= n_group or top_k > e:
        raise ValueError(f"fused_select_experts: bad grouping n_group={n_group}, topk_group={topk_group}, top_k={top_k}")
    if not uses_triton(logits):
        raise RuntimeError("fused_select_experts runs on CUDA (or under TRITON_INTERPRET=1); use select_experts on the CPU")
    logits = logits.contiguous()
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((tokens, top_k), dtype=torch.int64, device=logits.device)
    if tokens:
        _gate_kernel[(tokens,)](logits, bias.contiguous(), weights, ids, logits.stride(0), float(routed_scaling_factor),
                                E=e, E_PAD=triton.next_power_of_2(e), N_GROUP=n_group, TOPK_GROUP=topk_group, TOP_K=top_k, NORM=norm_topk_prob,
                                num_warps=4)
    return weights, ids
