"""The paged MLA latent cache: per layer, (blocks, block_size, kv_lora_rank + rope_dim) values."""

from __future__ import annotations

import torch

from moecluster.workers.config import ModelConfig


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
