"""Random weights in a model's own slots: `load_format: random`, for benchmarks at full size.

A full-width slice of DeepSeek-V3 or Kimi K2 (a few layers at the published shapes) or the whole
model can be served without a checkpoint on disk: every slot the model lists is filled in place,
on the device it lives on, in the format the config declares (bf16, FP8 e4m3 with block scales,
INT4 packed nibbles with group scales), so the GPU kernels read exactly the bytes a real
checkpoint would give them. Values are deterministic per tensor name and seed (each slot gets a
generator seeded from a hash of its name), so the ranks of an expert-parallel group agree on
every shared weight and an expert's weights do not depend on which rank holds it.

Scales keep activations at unit size through any depth: a linear layer's effective weights have
standard deviation 1/sqrt(in_features), norms are one, biases zero, embeddings unit normal.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable

import torch

from moecluster.workers.model.weights import Slot
from moecluster.workers.quant.fp8 import FP8_DTYPE, FP8_E4M3_MAX

INT4_STD = math.sqrt(((16**2) - 1) / 12)  # a nibble uniform over 16 values (-8..7): its std


def _generator(name: str, seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


@torch.no_grad()
def fill_random(slots: Iterable[Slot], seed: int = 0) -> int:
    """Fill every slot; returns the bytes written. Metadata slots (INT4 `weight_shape`) need nothing."""
    written = 0
    in_features = 0  # of the weight just filled: its scales follow it in slot order
    filled: dict[str, torch.Tensor] = {}  # aliased slots (tied embeddings), once filled
    for slot in slots:
        target = slot.target
        if target is None:
            continue
        g = _generator(slot.name, seed, target.device)
        name = slot.name
        if slot.alias in filled:  # the same tensor as one already drawn (a tied head)
            target.copy_(filled[slot.alias])
        elif name.endswith(".weight_packed"):  # INT4: eight nibbles per int32, any bit pattern is valid
            target.copy_(torch.randint(-(2**31), 2**31 - 1, target.shape, generator=g, device=target.device,
                                       dtype=torch.int64).to(torch.int32))
            in_features = target.shape[-1] * 8
        elif name.endswith(".weight_scale"):  # INT4 group scales
            target.fill_(1.0 / (INT4_STD * math.sqrt(in_features)))
        elif name.endswith(".weight_scale_inv"):  # FP8 block scales
            target.fill_(1.0 / math.sqrt(in_features))
        elif target.dtype == FP8_DTYPE:  # unit normal e4m3; the block scale sets the size
            for row in target.view(-1, target.shape[-1]).split(4096):
                row.copy_(torch.randn(row.shape, generator=g, device=row.device).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX))
            in_features = target.shape[-1]
        elif not target.is_floating_point():
            raise TypeError(f"slot {name}: no random initialisation for dtype {target.dtype}")
        elif target.dim() == 1:  # norms are one, biases (the gate's score correction) zero
            target.fill_(1.0 if "norm" in name else 0.0)
        elif name.endswith("embed_tokens.weight"):
            target.normal_(0.0, 1.0, generator=g)
        else:  # a dense linear weight (out, in)
            in_features = target.shape[-1]
            target.normal_(0.0, 1.0 / math.sqrt(in_features), generator=g)
        if slot.alias is not None:
            filled[name] = target
        written += target.numel() * target.element_size()
    return written
