"""The paged MLA latent cache: per layer, (blocks, block_size, kv_lora_rank + rope_dim) values."""

from __future__ import annotations

import torch

from moecluster.workers.config import ModelConfig
from moecluster.workers.model.mla import CONTEXT_CHUNK, segmented


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return cfg.num_hidden_layers * block_size * cfg.latent_dim * torch.tensor([], dtype=dtype).element_size()


def allocate_kv_cache(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
) -> list[torch.Tensor]:
    """One (num_blocks, block_size, latent_dim) tensor per decoder layer, zero-filled."""
    return [
        torch.zeros((num_blocks, block_size, cfg.latent_dim), dtype=dtype, device=device)
        for _ in range(cfg.num_hidden_layers)
    ]


def activation_bytes(cfg: ModelConfig, tokens: int, dtype: torch.dtype, context: int = 0,
                     context_chunk: int = CONTEXT_CHUNK) -> int:
    """Peak memory of one forward over `tokens` new tokens (a full prefill chunk) of a sequence
    whose context reaches `context` tokens, reserved before the cache is sized. Per new token,
    the larger of the MoE layer (top_k routed copies of the hidden state: gathered input, expert
    output, the fp32 weighted copy and its cast, plus the intermediate) and the dense MLP (gate,
    up, product), plus attention's projections (q, output); per context token, the gathered latent
    row and its cast; per expanded context token (at most `context_chunk` of them, or the chunk's
    own rows: `workers/model/mla.py` expands a longer context a segment at a time), keys and
    head-dim-padded values for every head, plus one more copy of the values while they are padded;
    when segmented, the fp32 merged output, an fp32 temporary and one segment's output. A quarter
    on top for the allocator's rounding and what this count leaves out."""
    b = torch.finfo(dtype).bits // 8
    h, k = cfg.hidden_size, cfg.num_experts_per_tok
    moe = k * (h * (3 * b + 4) + cfg.moe_intermediate_size * b) if cfg.n_routed_experts else 0
    dense = 3 * cfg.intermediate_size * b
    attention = cfg.num_attention_heads * (2 * cfg.qk_head_dim + cfg.v_head_dim) * b  # per token, all heads
    per_token = max(moe, dense) + attention + 4 * h * b
    seen = max(context, tokens)
    expanded = min(seen, max(context_chunk, tokens))
    # segmented: the fp32 merged output and one fp32 temporary, and a segment's output (keys' head dim)
    merged = (tokens * cfg.num_attention_heads * (8 * cfg.v_head_dim + b * cfg.qk_head_dim)
              if segmented(tokens, seen, context_chunk) else 0)
    return int(1.25 * (tokens * per_token + expanded * attention + 2 * seen * cfg.latent_dim * b + merged))
