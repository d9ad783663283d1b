"""The noaux_tc gate of DeepSeek-V3 and Kimi K2, as a pure function.

Scores are sigmoids of the router logits. The per-expert correction bias is added for
selection only: groups are ranked by the sum of their two best biased scores, the top
`topk_group` groups are kept, and the top-k experts are chosen inside them. The weights are the
unbiased scores of the chosen experts, renormalised when `norm_topk_prob`, times
`routed_scaling_factor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GateConfig:
    num_experts: int
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float

    def __post_init__(self) -> None:
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group {self.n_group} does not divide num_experts {self.num_experts}")
        if not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"topk_group {self.topk_group} must be in 1..n_group ({self.n_group})")


def select_experts(
    logits: torch.Tensor, bias: torch.Tensor, cfg: GateConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (tokens, experts) float32, bias (experts,) -> weights (tokens, top_k) float32, ids (tokens, top_k) int64."""
    scores = logits.float().sigmoid()
    biased = scores + bias.float()
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        grouped = biased.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (tokens, n_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
        biased = biased.masked_fill(~keep.repeat_interleave(cfg.num_experts // cfg.n_group, dim=1), float("-inf"))
    ids = biased.topk(cfg.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids
