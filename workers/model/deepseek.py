"""The DeepSeek-V3 / Kimi K2 decoder stack: embeddings, MLA + (dense MLP | MoE) layers, lm_head.

The model takes one step's flat token batch (every sequence's new tokens end to end) with its
AttentionMetadata and the per-layer latent caches, and returns hidden states; `logits` applies
the final projection only to the rows the caller samples from. The MTP layers that DeepSeek-V3
checkpoints carry after the last decoder layer are not part of this stack.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch
from torch import nn

from moecluster.router.experts.dispatch import Dispatcher
from moecluster.workers.config import ModelConfig
from moecluster.workers.model.attention_metadata import AttentionMetadata
from moecluster.workers.model.mla import MLA
from moecluster.workers.model.moe import MLP, Experts, MoE
from moecluster.workers.model.rope import RotaryEmbedding
from moecluster.workers.model.weights import Linear, RMSNorm, Slot
from moecluster.workers.quant.scheme import Fp8BlockScheme


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        index: int,
        rope: RotaryEmbedding,
        dtype: torch.dtype,
        expert_ids: list[int] | None,
        dispatcher: Dispatcher | None,
    ) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        self.prefix = prefix
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLA(cfg, f"{prefix}.self_attn", rope, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp: MLP | MoE
        if cfg.is_moe_layer(index):
            self.mlp = MoE(cfg, f"{prefix}.mlp", dtype, expert_ids, dispatcher)
        else:
            self.mlp = MLP(cfg, f"{prefix}.mlp", cfg.intermediate_size, dtype)

    def slots(self) -> Iterator[Slot]:
        yield from self.input_layernorm.slots(f"{self.prefix}.input_layernorm")
        yield from self.self_attn.slots()
        yield from self.post_attention_layernorm.slots(f"{self.prefix}.post_attention_layernorm")
        yield from self.mlp.slots()

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache)
        h = self.post_attention_layernorm(x)
        return x + self.mlp(h, meta.token_mask)


class DeepseekV3Model(nn.Module):
    """`expert_ids` names the routed experts this rank holds (all when None); `dispatcher` moves
    tokens to them (local when None)."""

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        expert_ids: list[int] | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.rope = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, self.rope, dtype, expert_ids, dispatcher) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, None, dtype)

    def slots(self) -> Iterator[Slot]:
        # Tied embeddings (transformers' rule): a checkpoint that stores only one of the two
        # tensors fills both from it; one that stores both (its config does not describe it) keeps
        # both as stored. The head stays a copy of its own either way.
        tied = self.cfg.tie_word_embeddings
        yield Slot("model.embed_tokens.weight", self.embed_tokens, alias="lm_head.weight" if tied else None)
        for layer in self.layers:
            yield from layer.slots()
        yield from self.norm.slots("model.norm")
        head = self.lm_head.slots("lm_head")  # never quantized: its one dense weight
        yield from (replace(s, alias="model.embed_tokens.weight") for s in head) if tied else head

    @torch.no_grad()
    def prepare(self) -> None:
        """Derive load-time state from the loaded weights (absorbed MLA weights)."""
        for layer in self.layers:
            layer.self_attn.prepare()
        if self.embed_tokens.is_cuda:
            prepare_gpu(self, self.dtype)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """input_ids (tokens,) -> final hidden states (tokens, hidden)."""
        x = self.embed_tokens[input_ids]
        cos, sin = self.rope(meta.positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, meta, kv_cache)
        return self.norm(x)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (rows, hidden) -> float32 logits (rows, vocab)."""
        return self.lm_head(hidden).float()


@torch.no_grad()
def prepare_gpu(module: nn.Module, dtype: torch.dtype) -> None:
    """On a GPU, for a model or any part of one: dense layers dequantized once (FP8 blocks stay
    e4m3 and run W8A16 in `Linear.forward`; other formats -> dtype: attention, dense MLPs and
    shared experts are a small part of the model), and each MoE layer's experts put in the fused
    kernel's weight format (see `Experts.prepare_kernel`)."""
    for m in module.modules():
        if isinstance(m, Linear) and not isinstance(m.scheme, Fp8BlockScheme):
            m.materialize(dtype)
        elif isinstance(m, Experts):
            m.prepare_kernel()
