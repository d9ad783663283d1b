"""The fused MoE kernel's W8A16 mode (DeepSeek-V3 FP8 block-scaled experts) against its reference."""

from __future__ import annotations

import pytest
import torch

from moecluster.kernels.fused_moe import Fp8Experts, TileConfig, grouped_mlp, grouped_mlp_reference, uses_triton


def fp8_experts(e: int, h: int, i: int, block: tuple[int, int], device: torch.device, gen: torch.Generator) -> Fp8Experts:
    def one(o: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = (torch.randn(e, o, k, generator=gen) * 2).to(torch.float8_e4m3fn).to(device)
        s = (torch.rand(e, -(-o // block[0]), -(-k // block[1]), generator=gen) * 0.02 + 0.001).to(device)
        return w, s

    (g, gs), (u, us), (d, ds) = one(i, h), one(i, h), one(h, i)
    return Fp8Experts(g, gs, u, us, d, ds, block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("h", "i", "block", "counts"), [
    (64, 32, (32, 32), [3, 0, 17]),
    (96, 80, (32, 32), [1, 20, 5, 0]),  # dims not multiples of the scale block
    (128, 64, (64, 32), [40]),
])
def test_fp8_grouped_mlp_matches_reference(device, dtype, h, i, block, counts) -> None:
    if device.type == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 dots in the interpreter: covered on the GPU")
    gen = torch.Generator().manual_seed(hash((h, i, block, tuple(counts))) % 2**31)
    w = fp8_experts(len(counts), h, i, block, device, gen)
    x = (torch.randn(sum(counts), h, generator=gen) * 0.5).to(device=device, dtype=dtype)
    c = torch.tensor(counts, dtype=torch.int32, device=device)
    assert uses_triton(x)
    out = torch.full((x.shape[0], h), float("nan"), dtype=dtype, device=device)
    tiles = TileConfig(16, 32, 32, 4, 2)
    got = grouped_mlp(x, c, w, out=out, gate_up_tiles=tiles, down_tiles=tiles)
    want = grouped_mlp_reference(x, c, w)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2 if dtype == torch.float16 else 1e-4,
                               atol=2e-2 if dtype == torch.float16 else 1e-4)


def test_fp8_scale_shapes_are_checked(device) -> None:
    gen = torch.Generator().manual_seed(0)
    w = fp8_experts(2, 64, 32, (32, 32), device, gen)
    with pytest.raises(ValueError, match="gate_scale"):
        Fp8Experts(w.gate, w.gate_scale[:, :, :1], w.up, w.up_scale, w.down, w.down_scale, w.block)


@pytest.mark.gpu
def test_fp8_deepseek_shape_bf16() -> None:
    gen = torch.Generator().manual_seed(1)
    dev = torch.device("cuda")
    w = fp8_experts(4, 7168, 2048, (128, 128), dev, gen)
    counts = [8, 64, 1, 30]
    x = (torch.randn(sum(counts), 7168, generator=gen) * 0.1).to(device=dev, dtype=torch.bfloat16)
    c = torch.tensor(counts, dtype=torch.int32, device=dev)
    got = grouped_mlp(x, c, w)
    want = grouped_mlp_reference(x, c, w)
    rel = (got.float() - want.float()).norm() / want.float().norm()
    assert rel < 1e-2, rel


@pytest.mark.parametrize(("rows", "n", "k", "block"), [(1, 64, 96, (32, 32)), (20, 80, 64, (32, 32)), (33, 64, 128, (64, 64))])
def test_fp8_linear_matches_dequantized_matmul(device, rows, n, k, block) -> None:
    from moecluster.kernels.fused_moe import dequantize_fp8, fp8_linear

    gen = torch.Generator().manual_seed(rows * 1000 + n)
    w = (torch.randn(n, k, generator=gen) * 2).to(torch.float8_e4m3fn).to(device)
    s = (torch.rand(-(-n // block[0]), -(-k // block[1]), generator=gen) * 0.02 + 0.001).to(device)
    x = torch.randn(rows, k, generator=gen).to(device)
    got = fp8_linear(x, w, s, block)
    want = x @ dequantize_fp8(w, s, block, torch.float32).T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="scale"):
        fp8_linear(x, w, s[:1, :1], block)
