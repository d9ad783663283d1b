"""Expert weight containers of the fused MoE kernels and their load-time conversions.

Dense (bf16 / fp16 / fp32) weights are used as loaded; INT4 (compressed-tensors pack-quantized,
group 32) is repacked once into the K-major word layout the W4A16 kernel reads (see `repack_int4`);
FP8 (DeepSeek-V3 e4m3 with 128 x 128 block scales) is used as loaded by the W8A16 mode. The
dequantizing helpers are what the torch references and tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_GROUP_SIZE = 32
DEFAULT_K_BLOCK = 256  # sub-tiles of 32 inputs, one scale group each (group sizes that are multiples of 32)
_MIN_DOT = 16  # tl.dot needs every dimension >= 16


# ---------------------------------------------------------------------------------------------
# Weight containers
# ---------------------------------------------------------------------------------------------


class _StackedGate:
    """Sizes read off a stacked (E, I, H) `gate` tensor (dense and FP8 experts)."""

    gate: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def hidden(self) -> int:
        return self.gate.shape[2]

    @property
    def intermediate(self) -> int:
        return self.gate.shape[1]

    @property
    def device(self) -> torch.device:
        return self.gate.device


@dataclass(frozen=True)
class DenseExperts(_StackedGate):
    """Dense (bf16 / fp16 / fp32) stacked expert weights in checkpoint orientation, any strides."""

    gate: torch.Tensor  # (E, I, H)
    up: torch.Tensor  # (E, I, H)
    down: torch.Tensor  # (E, H, I)

    def __post_init__(self) -> None:
        for name in ("gate", "up", "down"):
            t = getattr(self, name)
            if t.ndim != 3 or t.dtype not in _FLOAT_DTYPES:
                raise ValueError(f"DenseExperts.{name}: expected a 3-D float tensor, got {t.dtype} {tuple(t.shape)}")
        e, i, h = self.gate.shape
        if tuple(self.up.shape) != (e, i, h) or tuple(self.down.shape) != (e, h, i):
            raise ValueError(
                f"DenseExperts: gate {tuple(self.gate.shape)}, up {tuple(self.up.shape)}, "
                f"down {tuple(self.down.shape)}: expected (E, I, H), (E, I, H), (E, H, I)"
            )
        if self.gate.stride() != self.up.stride():
            raise ValueError("DenseExperts: gate and up must have the same strides (the kernel shares them)")
        if len({self.gate.device, self.up.device, self.down.device}) != 1:
            raise ValueError("DenseExperts: weights on different devices")


@dataclass(frozen=True)
class Int4Weight:
    """One stacked INT4 projection (E, out, in) in the kernel's layout (see the module docstring)."""

    packed: torch.Tensor  # int32 (E, K_pad // 8, N)
    scale: torch.Tensor  # float (E, K_pad // group_size, N)
    in_features: int  # K, before padding to k_block
    group_size: int = DEFAULT_GROUP_SIZE
    k_block: int | None = None  # None: default_k_block(group_size)

    def __post_init__(self) -> None:
        if self.k_block is None:
            object.__setattr__(self, "k_block", default_k_block(self.group_size))
        _check_int4_params(self.in_features, self.group_size, self.k_block)
        if self.packed.dtype != torch.int32 or self.packed.ndim != 3:
            raise ValueError(f"Int4Weight.packed: expected int32 (E, K_pad/8, N), got {_desc(self.packed)}")
        e, words, n = self.packed.shape
        k_pad = padded_k(self.in_features, self.group_size, self.k_block)
        if words * 8 != k_pad:
            raise ValueError(
                f"Int4Weight.packed: {words} word rows hold {words * 8} inputs, expected "
                f"in_features={self.in_features} padded to a multiple of k_block={self.k_block} and "
                f"group_size={self.group_size}: {k_pad}"
            )
        expect = (e, k_pad // self.group_size, n)
        if self.scale.dtype not in _FLOAT_DTYPES or tuple(self.scale.shape) != expect:
            raise ValueError(f"Int4Weight.scale: expected a float tensor {expect}, got {_desc(self.scale)}")
        if self.packed.device != self.scale.device:
            raise ValueError("Int4Weight: packed and scale on different devices")

    @property
    def num_experts(self) -> int:
        return self.packed.shape[0]

    @property
    def out_features(self) -> int:
        return self.packed.shape[2]


@dataclass(frozen=True)
class Int4Experts:
    """W4A16 stacked expert weights, each projection repacked by `repack_int4`."""

    gate: Int4Weight  # (E, I, H)
    up: Int4Weight  # (E, I, H)
    down: Int4Weight  # (E, H, I)

    def __post_init__(self) -> None:
        e, i, h = self.gate.num_experts, self.gate.out_features, self.gate.in_features
        for name, w, (want_out, want_in) in (("up", self.up, (i, h)), ("down", self.down, (h, i))):
            if (w.num_experts, w.out_features, w.in_features) != (e, want_out, want_in):
                raise ValueError(
                    f"Int4Experts.{name}: (E, out, in) = {(w.num_experts, w.out_features, w.in_features)}, "
                    f"expected {(e, want_out, want_in)}"
                )
        g, u = self.gate, self.up
        if (g.group_size, g.k_block, g.packed.stride(), g.scale.stride(), g.scale.dtype) != (
            u.group_size, u.k_block, u.packed.stride(), u.scale.stride(), u.scale.dtype
        ):
            raise ValueError("Int4Experts: gate and up must share group_size, k_block, strides and scale dtype")
        if len({g.packed.device, u.packed.device, self.down.packed.device}) != 1:
            raise ValueError("Int4Experts: weights on different devices")

    @classmethod
    def from_compressed_tensors(
        cls,
        gate: tuple[torch.Tensor, torch.Tensor],
        up: tuple[torch.Tensor, torch.Tensor],
        down: tuple[torch.Tensor, torch.Tensor],
        hidden: int,
        intermediate: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        k_block: int | None = None,
    ) -> "Int4Experts":
        """Each projection as the checkpoint's (weight_packed (E, out, in/8), weight_scale (E, out, in/g))."""
        return cls(
            gate=repack_int4(*gate, intermediate, hidden, group_size=group_size, k_block=k_block),
            up=repack_int4(*up, intermediate, hidden, group_size=group_size, k_block=k_block),
            down=repack_int4(*down, hidden, intermediate, group_size=group_size, k_block=k_block),
        )

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def hidden(self) -> int:
        return self.gate.in_features

    @property
    def intermediate(self) -> int:
        return self.gate.out_features

    @property
    def device(self) -> torch.device:
        return self.gate.packed.device


@dataclass(frozen=True)
class Fp8Experts(_StackedGate):
    """DeepSeek-V3's FP8 experts as loaded: e4m3 weights in checkpoint orientation and one float32
    scale per (block_out x block_in) block (`weight_scale_inv`, the dequantization factor). W8A16:
    the kernel converts each e4m3 tile to the activation dtype (exact: e4m3 fits bf16 / fp16);
    W8A8: it multiplies e4m3 activations (quantized per (row, block_in) group) by the e4m3 tile.
    Either way the block's scale goes on the tile's fp32 partial product, so BLOCK_K must divide
    block_in."""

    gate: torch.Tensor  # float8_e4m3fn (E, I, H)
    gate_scale: torch.Tensor  # float32 (E, ceil(I / bo), ceil(H / bi))
    up: torch.Tensor
    up_scale: torch.Tensor
    down: torch.Tensor  # (E, H, I)
    down_scale: torch.Tensor  # (E, ceil(H / bo), ceil(I / bi))
    block: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        bo, bi = self.block
        e, i, h = self.gate.shape
        for name, w, sc, (o, k) in (("gate", self.gate, self.gate_scale, (i, h)), ("up", self.up, self.up_scale, (i, h)),
                                    ("down", self.down, self.down_scale, (h, i))):
            if w.dtype != torch.float8_e4m3fn or tuple(w.shape) != (e, o, k):
                raise ValueError(f"Fp8Experts.{name}: expected float8_e4m3fn {(e, o, k)}, got {_desc(w)}")
            want = (e, -(-o // bo), -(-k // bi))
            if sc.dtype != torch.float32 or tuple(sc.shape) != want:
                raise ValueError(f"Fp8Experts.{name}_scale: expected float32 {want}, got {_desc(sc)}")
        if self.gate.stride() != self.up.stride() or self.gate_scale.stride() != self.up_scale.stride():
            raise ValueError("Fp8Experts: gate and up must have the same strides (the kernel shares them)")


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """(E, out, in) e4m3 with block scales -> dense dtype (the reference's weights)."""
    bo, bi = block
    o, k = w.shape[-2:]
    full = scale.repeat_interleave(bo, dim=-2)[..., :o, :].repeat_interleave(bi, dim=-1)[..., :k]  # (E, out, in)
    return (w.float() * full).to(dtype)


ExpertWeights = DenseExperts | Int4Experts | Fp8Experts


# ---------------------------------------------------------------------------------------------
# INT4 repacking (torch, once at load time)
# ---------------------------------------------------------------------------------------------


REPACK_TEMP_BYTES = 1 << 30  # bound on repack_int4's temporaries


def repack_int4(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    out_features: int,
    in_features: int,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    k_block: int | None = None,
) -> Int4Weight:
    """compressed-tensors pack-quantized -> the kernel layout (module docstring).

    weight_packed int32 (E, out, in/8) or (out, in/8), 8 consecutive inputs per word (value k as
    q + 8 at bits 4k..4k+3); weight_scale (E, out, in/group) or (out, in/group). A 2-D weight
    becomes E = 1. Returns new contiguous tensors on the same device; the scale keeps its dtype.
    k_block None: `default_k_block(group_size)`.
    """
    k_block = default_k_block(group_size) if k_block is None else k_block
    _check_int4_params(in_features, group_size, k_block)
    if weight_packed.ndim == 2:
        weight_packed, weight_scale = weight_packed.unsqueeze(0), weight_scale.unsqueeze(0)
    if weight_packed.dtype != torch.int32 or weight_packed.ndim != 3:
        raise ValueError(f"repack_int4: weight_packed must be int32 (E, out, in/8), got {_desc(weight_packed)}")
    e = weight_packed.shape[0]
    if tuple(weight_packed.shape) != (e, out_features, in_features // 8):
        raise ValueError(
            f"repack_int4: weight_packed {tuple(weight_packed.shape)} does not match out={out_features}, "
            f"in={in_features}: expected {(e, out_features, in_features // 8)}"
        )
    scale_shape = (e, out_features, in_features // group_size)
    if weight_scale.dtype not in _FLOAT_DTYPES or tuple(weight_scale.shape) != scale_shape:
        raise ValueError(f"repack_int4: weight_scale {_desc(weight_scale)}: expected a float tensor {scale_shape}")
    k_pad = padded_k(in_features, group_size, k_block)
    packed = torch.empty((e, k_pad // 8, out_features), dtype=torch.int32, device=weight_packed.device)
    # A few experts at a time: the nibble temporaries (int32 and int64 copies of every input,
    # about 20 bytes each at the peak) would need tens of GiB for a Kimi K2 layer at once.
    chunk = max(1, REPACK_TEMP_BYTES // max(1, out_features * k_pad * 20))
    for start in range(0, e, chunk):
        part = weight_packed[start : start + chunk]
        packed[start : start + part.shape[0]] = _repack_words(part, out_features, in_features, k_pad, k_block)
    scale = F.pad(weight_scale, (0, (k_pad - in_features) // group_size))  # (E, N, K_pad/g)
    scale = scale.transpose(1, 2).contiguous()  # (E, K_pad/g, N)
    return Int4Weight(packed, scale, in_features, group_size, k_block)


def _repack_words(weight_packed: torch.Tensor, n: int, k: int, k_pad: int, k_block: int) -> torch.Tensor:
    """(e, N, K/8) checkpoint words -> (e, K_pad/8, N) kernel words (module docstring)."""
    e, p = weight_packed.shape[0], k_block // 8
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=weight_packed.device)  # (8,)
    nib = (weight_packed.unsqueeze(-1) >> shifts) & 0xF  # (e, N, K/8, 8), q + 8
    nib = nib.reshape(e, n, k)  # (e, N, K)
    # Padding inputs get nibble 8 (q = 0) and scale 0: they add exactly nothing.
    nib = F.pad(nib, (0, k_pad - k), value=8)  # (e, N, K_pad)
    nib = nib.reshape(e, n, k_pad // k_block, 8, p).to(torch.int64)  # (e, N, blocks, s, j)
    words = (nib << (4 * torch.arange(8, device=nib.device)).view(1, 1, 1, 8, 1)).sum(dim=3)  # (e, N, blocks, P)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement
    return words.reshape(e, n, k_pad // 8).transpose(1, 2)  # (e, K_pad/8, N)


def unrepack_int4(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of repack_int4: -> (weight_packed int32 (E, out, in/8), weight_scale (E, out, in/g))."""
    e, n, k, g = w.num_experts, w.out_features, w.in_features, w.group_size
    q = _unpack_kernel_layout(w)[:, :, :k]  # (E, N, K), q + 8
    nib = q.reshape(e, n, k // 8, 8).to(torch.int64)
    words = (nib << (4 * torch.arange(8, device=nib.device))).sum(dim=-1)  # (E, N, K/8)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words, w.scale.transpose(1, 2)[:, :, : k // g].contiguous()


def dequantize_int4(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense (E, out, in) weight: (q * scale) in fp32, cast to dtype (as the kernel does)."""
    k, g = w.in_features, w.group_size
    q = (_unpack_kernel_layout(w)[:, :, :k] - 8).float()  # (E, N, K)
    s = w.scale.transpose(1, 2)[:, :, : k // g].float()  # (E, N, K/g)
    return (q.reshape(*q.shape[:2], k // g, g) * s.unsqueeze(-1)).reshape(q.shape).to(dtype)


def _unpack_kernel_layout(w: Int4Weight) -> torch.Tensor:
    """Kernel-layout words -> nibbles (q + 8) as int32 (E, N, K_pad)."""
    e, words, n = w.packed.shape
    p = w.k_block // 8
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w.packed.device)
    nib = (w.packed.transpose(1, 2).unsqueeze(-1) >> shifts) & 0xF  # (E, N, K_pad/8, s)
    nib = nib.reshape(e, n, words // p, p, 8).transpose(3, 4)  # (E, N, blocks, s, j)
    return nib.reshape(e, n, words * 8)


def _desc(t: torch.Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)}"


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def default_k_block(group_size: int) -> int:
    """The repack's inputs per packed block: 256 (sub-tiles of 32 inputs) where the group size is a
    multiple of 32 that nests with 256 (Kimi K2: 32), else 128 (sub-tiles of 16, which must
    divide the group)."""
    nests = DEFAULT_K_BLOCK % group_size == 0 or group_size % DEFAULT_K_BLOCK == 0
    return DEFAULT_K_BLOCK if group_size % (DEFAULT_K_BLOCK // 8) == 0 and nests else 128


def padded_k(in_features: int, group_size: int, k_block: int) -> int:
    """K padded to whole packed blocks and whole scale groups (the kernel steps over k_blocks and
    reads one scale row per group; the two nest for the usual sizes, where this is a multiple of
    k_block)."""
    return _round_up(in_features, math.lcm(k_block, group_size))


def _check_int4_params(in_features: int, group_size: int, k_block: int) -> None:
    if group_size <= 0 or in_features <= 0 or in_features % 8 or in_features % group_size:
        raise ValueError(
            f"INT4: in_features={in_features} must be a positive multiple of 8 and of group_size={group_size}"
        )
    p = k_block // 8
    if k_block % 8 or p < _MIN_DOT or p & (p - 1) or group_size % p:
        raise ValueError(
            f"INT4: k_block={k_block} must be 8 * P with P a power of two >= {_MIN_DOT} that divides "
            f"group_size={group_size} (each unpacked sub-tile must lie in one group)"
        )
