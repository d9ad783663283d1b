"""MLA decode attention in absorbed form over the paged latent cache.

Each query head attends over a sequence's latent cache entries (kv_lora_rank compressed values
plus the shared rope key, per token), reading them through the sequence's block table. The
output stays in latent space (kv_lora_rank per head); the caller applies W_UV.

This module holds the torch reference, which is also the CPU path.
"""

from __future__ import annotations

import torch


def mla_decode_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """q (batch, heads, kv_lora_rank + rope_dim) over kv_cache (blocks, block_size, kv_lora_rank + rope_dim)
    with block_tables (batch, max_blocks) and seq_lens (batch,) -> (batch, heads, kv_lora_rank)."""
    batch, _, dim = q.shape
    if kv_cache.shape[-1] != dim:
        raise ValueError(f"q has {dim} values per head but the cache holds {kv_cache.shape[-1]} per token")
    if batch == 0:
        return q.new_empty((0, q.shape[1], kv_lora_rank))
    block_size = kv_cache.shape[1]
    max_len = int(seq_lens.max())
    n_blocks = -(-max_len // block_size)
    kv = kv_cache[block_tables[:, :n_blocks].long()]  # (batch, n_blocks, block_size, dim)
    kv = kv.reshape(batch, n_blocks * block_size, dim)[:, :max_len].to(q.dtype)  # (batch, max_len, dim)
    scores = torch.einsum("bhd,bld->bhl", q, kv).float() * scale  # (batch, heads, max_len)
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None].to(q.device)  # (batch, max_len)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.einsum("bhl,blc->bhc", probs, kv[..., :kv_lora_rank])  # (batch, heads, kv_lora_rank)
