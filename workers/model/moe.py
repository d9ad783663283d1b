"""Feed-forward blocks: the dense SwiGLU MLP and the MoE layer (gate -> dispatch -> experts -> combine).

The MoE layer never branches on how experts are deployed: a `Dispatcher` decides which tokens
reach this rank's experts and how results come back; `Experts` holds only this rank's experts.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moecluster.kernels.fused_moe import (
    DenseExperts, ExpertWeights, Fp8Experts, Int4Experts, grouped_mlp, repack_int4,
)
from moecluster.kernels.moe_gate import fusable, fused_select_experts
from moecluster.kernels.stable_argsort import stable_argsort
from moecluster.router.experts.dispatch import Dispatcher, LocalDispatch, count_ids
from moecluster.router.experts.gate import GateConfig, select_experts
from moecluster.workers.config import ModelConfig
from moecluster.workers.quant.scheme import Fp8BlockScheme, Int4GroupScheme
from moecluster.workers.model.weights import Linear, QuantWeight, Slot, scheme_for


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); the dense layers and the shared experts."""

    def __init__(self, cfg: ModelConfig, prefix: str, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.prefix = prefix
        h = cfg.hidden_size
        self.gate_proj = Linear(h, intermediate, scheme_for(cfg.quant, f"{prefix}.gate_proj"), dtype)
        self.up_proj = Linear(h, intermediate, scheme_for(cfg.quant, f"{prefix}.up_proj"), dtype)
        self.down_proj = Linear(intermediate, h, scheme_for(cfg.quant, f"{prefix}.down_proj"), dtype)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (tokens, H) -> (tokens, H); token_mask is the MoE layer's (nothing to count here)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def slots(self) -> Iterator[Slot]:
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield from getattr(self, name).slots(f"{self.prefix}.{name}")


class Experts(nn.Module):
    """The routed experts this rank owns, stacked: global ids `expert_ids`, local index = position."""

    def __init__(self, cfg: ModelConfig, prefix: str, expert_ids: list[int], dtype: torch.dtype) -> None:
        super().__init__()
        self.prefix, self.expert_ids = prefix, list(expert_ids)
        h, i, n = cfg.hidden_size, cfg.moe_intermediate_size, len(expert_ids)
        # Quantization is decided per module path; every expert of a layer shares one format.
        def scheme(name: str):  # noqa: ANN202
            return scheme_for(cfg.quant, f"{prefix}.{expert_ids[0]}.{name}") if expert_ids else None

        self.gate_proj = QuantWeight(i, h, scheme("gate_proj"), dtype, lead=(n,))  # (local, I, H)
        self.up_proj = QuantWeight(i, h, scheme("up_proj"), dtype, lead=(n,))  # (local, I, H)
        self.down_proj = QuantWeight(h, i, scheme("down_proj"), dtype, lead=(n,))  # (local, H, I)
        self.dtype = dtype
        self._kernel_weights: ExpertWeights | None = None  # set on a GPU by prepare_kernel

    def slots(self) -> Iterator[Slot]:
        for name in ("gate_proj", "up_proj", "down_proj"):
            paths = [f"{self.prefix}.{e}.{name}" for e in self.expert_ids]
            yield from getattr(self, name).slots(paths)

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every stacked tensor of this rank's experts, each (local slots, ...), in a fixed order:
        the form the weights are held in (INT4 on a GPU: the kernel's layout, the only copy)."""
        if isinstance(self._kernel_weights, Int4Experts):
            k = self._kernel_weights
            return [t for w in (k.gate, k.up, k.down) for t in (w.packed, w.scale)]
        return [t for name in ("gate_proj", "up_proj", "down_proj") for t in getattr(self, name).buffers()]

    def load_slots(self, tensors: list[torch.Tensor], expert_ids: list[int]) -> None:
        """Swap in a new set of local experts (same layout as `slot_tensors`), e.g. after EPLB."""
        for old, new in zip(self.slot_tensors(), tensors):
            old.copy_(new)
        self.expert_ids = list(expert_ids)

    @torch.no_grad()
    def prepare_kernel(self) -> None:
        """On a GPU, the fused MoE kernel's weights: dense (bf16) weights and FP8 blocks (W8A16:
        e4m3 kept, a bf16 copy of DeepSeek-V3's experts would not fit a node) as loaded, no copy;
        INT4 groups repacked into the W4A16 kernel's layout, which then replaces the checkpoint
        layout (one copy on the GPU: Kimi K2-Thinking's experts fill most of an H200 as it is;
        EPLB moves the kernel layout)."""
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if not self.expert_ids:
            return
        if all(isinstance(p.scheme, Fp8BlockScheme) for p in projections):
            g, u, d = projections
            self._kernel_weights = Fp8Experts(g.weight, g.weight_scale_inv, u.weight, u.weight_scale_inv,
                                              d.weight, d.weight_scale_inv, tuple(g.scheme.block))
        elif all(p.scheme is None for p in projections):
            self._kernel_weights = DenseExperts(self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        elif all(isinstance(p.scheme, Int4GroupScheme) for p in projections):
            g = projections[0].scheme.group_size
            self._kernel_weights = Int4Experts(*(
                repack_int4(p.weight_packed, p.weight_scale, p.out_features, p.in_features, group_size=g)
                for p in projections
            ))
            for p in projections:
                p.drop_payload("its experts run from the INT4 kernel layout")
        else:
            raise NotImplementedError(
                f"{self.prefix}: the fused MoE kernel needs gate, up and down in one format, got "
                f"{[type(p.scheme).__name__ for p in projections]}"
            )

    def forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """tokens (routed, H) grouped by local expert, tokens_per_expert (local,) int -> (routed, H)."""
        if self._kernel_weights is not None and tokens.is_cuda:  # fused Triton kernels, counts stay on the GPU
            return grouped_mlp(tokens, tokens_per_expert, self._kernel_weights)
        out = torch.empty_like(tokens)
        start = 0
        for local, count in enumerate(tokens_per_expert.tolist()):
            if count:
                x = tokens[start : start + count]
                gate = F.linear(x, self.gate_proj.dequantize(x.dtype, local))
                up = F.linear(x, self.up_proj.dequantize(x.dtype, local))
                out[start : start + count] = F.linear(F.silu(gate) * up, self.down_proj.dequantize(x.dtype, local))
            start += count
        return out


class MoE(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        prefix: str,
        dtype: torch.dtype,
        expert_ids: list[int] | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.gate_cfg = GateConfig(
            num_experts=cfg.n_routed_experts,
            top_k=cfg.num_experts_per_tok,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        self._fused_gate = fusable(cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group)
        # The router stays in float32: its logits decide discrete choices.
        self.gate_weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size), requires_grad=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        # Tokens routed to each logical expert since the last reset: the EPLB recording.
        self.register_buffer("expert_counts", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False)
        ids = list(range(cfg.n_routed_experts)) if expert_ids is None else expert_ids
        self.experts = Experts(cfg, f"{prefix}.experts", ids, dtype)
        self.dispatcher: Dispatcher = dispatcher or LocalDispatch(cfg.n_routed_experts, stable_argsort)
        self.shared_experts = (
            MLP(cfg, f"{prefix}.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts, dtype)
            if cfg.n_shared_experts
            else None
        )

    def slots(self) -> Iterator[Slot]:
        yield Slot(f"{self.prefix}.gate.weight", self.gate_weight)
        yield Slot(f"{self.prefix}.gate.e_score_correction_bias", self.e_score_correction_bias)
        yield from self.experts.slots()
        if self.shared_experts is not None:
            yield from self.shared_experts.slots()

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (tokens, H) -> (tokens, H). token_mask (tokens,) int, 0 for padding rows (a CUDA graph's
        batch padded to its captured size): they run, but EPLB does not count their choices."""
        logits = F.linear(x.float(), self.gate_weight)  # (tokens, experts)
        c = self.gate_cfg
        if logits.is_cuda and self._fused_gate:  # the fused gate kernel on GPUs
            weights, ids = fused_select_experts(logits, self.e_score_correction_bias, c.num_experts, c.top_k, c.n_group,
                                                c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)
        else:
            weights, ids = select_experts(logits, self.e_score_correction_bias, c)
        per_choice = None if token_mask is None else token_mask.long()[:, None].expand_as(ids).reshape(-1)
        count_ids(ids.reshape(-1), self.expert_counts.shape[0], per_choice, out=self.expert_counts)
        dispatched = self.dispatcher.dispatch(x, ids, weights)
        out = self.dispatcher.combine(self.experts(dispatched.tokens, dispatched.tokens_per_expert), dispatched)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
