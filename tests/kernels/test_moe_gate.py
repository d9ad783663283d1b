"""The fused noaux_tc gate kernel against the reference gate (router.experts.gate)."""

from __future__ import annotations

import pytest
import torch

from moecluster.kernels.moe_gate import fused_select_experts
from moecluster.router.experts.gate import GateConfig, select_experts


@pytest.mark.parametrize(("experts", "top_k", "n_group", "topk_group", "norm"), [
    (16, 4, 4, 2, True),
    (32, 8, 8, 4, True),
    (64, 2, 1, 1, False),  # no grouping
    (256, 8, 8, 4, True),  # DeepSeek-V3
    (384, 8, 1, 1, True),  # Kimi K2 / K2-Thinking: 384 experts, one group (padded to 512 lanes)
    (24, 4, 1, 1, False),  # any expert count without group limiting
])
def test_fused_gate_matches_reference(device, experts, top_k, n_group, topk_group, norm) -> None:
    gen = torch.Generator().manual_seed(experts * 10 + top_k)
    tokens = 37
    logits = torch.randn(tokens, experts, generator=gen).to(device)
    bias = (torch.randn(experts, generator=gen) * 0.1).to(device)
    cfg = GateConfig(experts, top_k, n_group, topk_group, norm, 2.5)
    want_w, want_ids = select_experts(logits, bias, cfg)
    got_w, got_ids = fused_select_experts(logits, bias, experts, top_k, n_group, topk_group, norm, 2.5)
    # same experts in the same order (random logits: no ties), same weights
    assert torch.equal(got_ids.cpu(), want_ids.cpu())
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_fused_gate_rejects_bad_shapes(device) -> None:
    logits = torch.randn(3, 24, device=device)
    with pytest.raises(ValueError, match="powers of two"):  # group limiting over a non-power-of-two expert count
        fused_select_experts(logits, torch.zeros(24, device=device), 24, 4, 4, 2, True, 1.0)
    with pytest.raises(ValueError, match="powers of two"):
        fused_select_experts(logits, torch.zeros(24, device=device), 24, 3, 1, 1, True, 1.0)
