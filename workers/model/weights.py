"""Weights kept in their on-disk format, and the slots a checkpoint fills.

A `QuantWeight` holds one linear weight (out, in), or a stack of them with leading dims (for
experts: (local_experts, out, in)), as the checkpoint stores it: dense, FP8 with 128x128 block
scales, or INT4 packed eight to an int32 with group scales. Full-size models only fit this way.
On the CPU path compute dequantizes per use (W8A16 / W4A16); the CUDA kernels read the packed
form directly.

Every module lists the checkpoint tensors it owns as `Slot`s; the loader reads exactly those,
so a rank that owns a subset of experts never touches the other experts' bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from moecluster.kernels.fp8_linear import fp8_linear
from moecluster.kernels.rms_norm import rms_norm, rms_norm_reference
from moecluster.workers.quant import (
    Fp8BlockScheme,
    Int4GroupScheme,
    QuantScheme,
    dequantize_fp8_block,
    dequantize_int4_group,
)


@dataclass(frozen=True)
class Slot:
    """One checkpoint tensor: where it goes (a view into a module buffer) or, for metadata
    tensors such as INT4's `weight_shape`, the value it must hold."""

    name: str
    target: torch.Tensor | None = None
    expect: torch.Tensor | None = None
    keep_dtype: bool = False  # quantized payloads must arrive in exactly this dtype; floats are converted
    # Another checkpoint name holding the same tensor, read when `name` is absent (tied embeddings:
    # a checkpoint may store only one of `model.embed_tokens.weight` and `lm_head.weight`).
    alias: str | None = None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class QuantWeight(nn.Module):
    """A (lead..., out, in) weight in dense, FP8-block or INT4-group form."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        scheme: QuantScheme | None,
        dtype: torch.dtype,
        lead: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.out_features, self.in_features, self.lead = out_features, in_features, lead
        self.scheme = scheme
        self._dropped: str | None = None  # why the stored form was freed (drop_payload)
        shape = (*lead, out_features, in_features)
        if scheme is None:
            self.register_buffer("weight", torch.empty(shape, dtype=dtype))
        elif isinstance(scheme, Fp8BlockScheme):
            bo, bi = scheme.block
            self.register_buffer("weight", torch.empty(shape, dtype=torch.float8_e4m3fn))
            scale_shape = (*lead, cdiv(out_features, bo), cdiv(in_features, bi))
            self.register_buffer("weight_scale_inv", torch.empty(scale_shape, dtype=torch.float32))
        elif isinstance(scheme, Int4GroupScheme):
            g = scheme.group_size
            if in_features % 8 or in_features % g:
                raise ValueError(f"INT4 weight with in_features={in_features}: must be a multiple of 8 and of {g}")
            self.register_buffer("weight_packed", torch.empty((*lead, out_features, in_features // 8), dtype=torch.int32))
            # (lead..., out, in // group); the scale dtype is whatever the checkpoint stores
            self.register_buffer("weight_scale", torch.empty((*lead, out_features, in_features // g), dtype=dtype))
        else:
            raise TypeError(f"unknown quantization scheme {scheme!r}")

    def slots(self, names: list[str] | str) -> Iterator[Slot]:
        """Checkpoint slots: `names` is the module path, or one path per leading index (experts)."""
        paths = [names] if isinstance(names, str) else names
        views: list[int | slice] = [slice(None)] if isinstance(names, str) else list(range(len(paths)))
        for path, idx in zip(paths, views):
            if self.scheme is None:
                yield Slot(f"{path}.weight", self.weight[idx])
            elif isinstance(self.scheme, Fp8BlockScheme):
                yield Slot(f"{path}.weight", self.weight[idx], keep_dtype=True)
                yield Slot(f"{path}.weight_scale_inv", self.weight_scale_inv[idx])
            else:
                yield Slot(f"{path}.weight_packed", self.weight_packed[idx], keep_dtype=True)
                yield Slot(f"{path}.weight_scale", self.weight_scale[idx])
                yield Slot(f"{path}.weight_shape", expect=torch.tensor([self.out_features, self.in_features]))

    def drop_payload(self, why: str) -> None:
        """Free the stored form once a kernel holds its own copy (its buffers become empty)."""
        for name, buf in list(self._buffers.items()):
            if buf is not None:
                self._buffers[name] = buf.new_empty(0)
        self._dropped = why

    def dequantize(self, dtype: torch.dtype, index: int | None = None) -> torch.Tensor:
        """The dense (out, in) weight (or the whole stack when index is None) in dtype."""
        if self._dropped:
            raise RuntimeError(f"this weight's stored form was freed ({self._dropped})")
        pick = (lambda t: t) if index is None else (lambda t: t[index])
        if self.scheme is None:
            return pick(self.weight).to(dtype)
        if isinstance(self.scheme, Fp8BlockScheme):
            return dequantize_fp8_block(pick(self.weight), pick(self.weight_scale_inv), self.scheme.block, dtype)
        return dequantize_int4_group(
            pick(self.weight_packed), pick(self.weight_scale), self.scheme.group_size, self.in_features, dtype
        )


    @torch.no_grad()
    def materialize(self, dtype: torch.dtype) -> None:
        """Dequantize once, in place: from now on a dense `weight` (lead..., out, in) in dtype.
        On GPUs, dense layers quantized other than FP8 take this at load time (FP8 ones run the
        W8A16 kernel instead); see docs/architecture.md (FP8 on the GPU)."""
        if self.scheme is None:
            return
        dense = self.dequantize(dtype)
        for name in ("weight", "weight_scale_inv", "weight_packed", "weight_scale"):
            if name in self._buffers:
                del self._buffers[name]
        self.scheme = None
        self.register_buffer("weight", dense)


class Linear(QuantWeight):
    """A bias-free linear layer over a QuantWeight: y = x @ W.T."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme | None, dtype: torch.dtype) -> None:
        super().__init__(out_features, in_features, scheme, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and isinstance(self.scheme, Fp8BlockScheme):  # the weight stays e4m3 (W8A16 / W8A8 by rows)
            y = fp8_linear(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale_inv, tuple(self.scheme.block))
            return y.reshape(*x.shape[:-1], self.out_features)
        return torch.nn.functional.linear(x, self.dequantize(x.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return rms_norm(x, self.weight, self.eps)  # one Triton launch
        return rms_norm_reference(x, self.weight, self.eps)

    def slots(self, path: str) -> Iterator[Slot]:
        yield Slot(f"{path}.weight", self.weight)


def scheme_for(scheme: QuantScheme | None, module_path: str) -> QuantScheme | None:
    """The scheme a given HF module path is stored in (None: dense)."""
    if scheme is None or not scheme.is_quantized(module_path):
        return None
    return scheme
