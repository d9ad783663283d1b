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


def deepseek_case(counts: list[int], seed: int) -> tuple[Fp8Experts, torch.Tensor, torch.Tensor]:
    """Four experts at DeepSeek-V3's shapes on the GPU, bf16 rows for them, the counts there."""
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda")
    w = fp8_experts(len(counts), 7168, 2048, (128, 128), dev, gen)
    x = (torch.randn(sum(counts), 7168, generator=gen) * 0.1).to(device=dev, dtype=torch.bfloat16)
    return w, x, torch.tensor(counts, dtype=torch.int32, device=dev)


@pytest.mark.gpu
def test_fp8_deepseek_shape_bf16() -> None:
    w, x, c = deepseek_case([8, 64, 1, 30], seed=1)
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


@pytest.mark.parametrize(("split", "k", "w8a8"), [(2, 256, False), (3, 200, False), (5, 96, False), (2, 256, True)])
def test_fp8_linear_split_k_matches_whole_k(device, split, k, w8a8) -> None:
    """K cut over `split` programs (fp32 partials added after) equals the whole-K product: uneven
    splits, a ragged last K step (k = 200, block_k 32, scale blocks 64 wide), W8A8."""
    from moecluster.kernels.fused_moe import TileConfig, dequantize_fp8, fp8_linear, uses_triton
    from moecluster.kernels.fused_moe_ref import fp8_round_trip

    gen = torch.Generator().manual_seed(split * 100 + k)
    rows, n, block = 5, 48, (32, 64) if not w8a8 else (32, 32)
    w = (torch.randn(n, k, generator=gen) * 2).to(torch.float8_e4m3fn).to(device)
    s = (torch.rand(-(-n // block[0]), -(-k // block[1]), generator=gen) * 0.02 + 0.001).to(device)
    x = torch.randn(rows, k, generator=gen).to(device)
    assert uses_triton(x)
    tiles = TileConfig(16, 16, 32, 4, 2, split_k=split)
    got = fp8_linear(x, w, s, block, tiles=tiles, fp8_activations=w8a8)
    a = fp8_round_trip(x, block[1]) if w8a8 else x
    want = a.float() @ dequantize_fp8(w, s, block, torch.float32).T
    assert got.shape == (rows, n) and got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    whole = fp8_linear(x, w, s, block, tiles=TileConfig(16, 16, 32, 4, 2, split_k=1), fp8_activations=w8a8)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="split_k"):
        fp8_linear(x, w, s, block, tiles=TileConfig(16, 16, 32, 4, 2, split_k=-1))


def test_linear_split_k_fills_the_gpu_only_when_the_grid_does_not() -> None:
    from moecluster.kernels.moe_tiles import linear_split_k

    assert linear_split_k(programs=264, k_steps=56, sms=132) == 1  # the grid fills the GPU
    assert linear_split_k(programs=12, k_steps=256, sms=132) == 16  # 2 waves: 22 -> the nearest power of two
    assert linear_split_k(programs=12, k_steps=56, sms=132) == 14  # capped: at least 4 K steps a split
    assert linear_split_k(programs=56, k_steps=256, sms=132, waves=2) == 4  # o at 64 rows: 5 -> 4
    assert linear_split_k(programs=1, k_steps=12, sms=132) == 3  # rounding never passes the cap
    assert linear_split_k(programs=100, k_steps=3, sms=132) == 1  # too short to split


# ---- W8A8: activations quantized to e4m3 per (row, block_in group) -----------------------------


@pytest.mark.parametrize(("rows", "k", "group"), [(1, 128, 128), (37, 200, 64), (18, 96, 32)])
def test_quantize_fp8_groups_kernel_equals_reference(device, rows, k, group) -> None:
    from moecluster.kernels.fp8_quant import dequantize_fp8_groups, quantize_fp8_groups, quantize_fp8_groups_reference

    gen = torch.Generator().manual_seed(rows * 7 + k)
    x = (torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 10).to(device)
    x[0, :group] = 0.0  # an all-zero group: scale 1, q 0
    q, s = quantize_fp8_groups(x, group)
    rq, rs = quantize_fp8_groups_reference(x.cpu(), group)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (rows, -(-k // group))
    assert torch.equal(q.cpu().float(), rq.float()) and torch.equal(s.cpu(), rs)
    assert s[0, 0] == 1.0 and not q[0, :group].float().any()
    back = dequantize_fp8_groups(q, s, group, torch.float32)
    assert ((back - x).abs() <= x.abs() * 0.07 + 1e-6).all()  # e4m3: 3 mantissa bits
    with pytest.raises(ValueError, match="group"):
        quantize_fp8_groups(x, 48)


@pytest.mark.parametrize(("h", "i", "block", "counts"), [(64, 32, (32, 32), [3, 0, 17]), (96, 80, (32, 32), [1, 20, 5, 0])])
def test_fp8_w8a8_grouped_mlp_matches_reference(device, h, i, block, counts) -> None:
    """The W8A8 kernels = the reference that quantizes x and h the same way (exact e4m3 products
    in fp32); and they stay near W8A16 (the quantization is real, not skipped)."""
    gen = torch.Generator().manual_seed(h * 1009 + i * 17 + len(counts))
    w = fp8_experts(len(counts), h, i, block, device, gen)
    tokens = (torch.randn(9, h, generator=gen) * 0.5).to(device)
    src = torch.randint(0, 9, (sum(counts),), generator=gen).to(device)
    c = torch.tensor(counts, dtype=torch.int32, device=device)
    out = torch.full((sum(counts), h), float("nan"), device=device)
    tiles = TileConfig(16, 32, 32, 4, 2, group_m=2)
    got = grouped_mlp(tokens, c, w, src_rows=src, out=out, gate_up_tiles=tiles, down_tiles=tiles, fp8_activations=True)
    want = grouped_mlp_reference(tokens, c, w, src_rows=src, fp8_activations=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    exact = grouped_mlp_reference(tokens, c, w, src_rows=src)
    rel = (got - exact).norm() / exact.norm()
    assert 1e-4 < rel < 0.1, rel


def test_fp8_w8a8_linear_and_defaults(device) -> None:
    from moecluster.kernels.fused_moe import (
        W8A8_DECODE_LINEAR_MIN_ROWS, W8A8_LINEAR_MIN_ROWS, W8A8_MIN_ROWS, DenseExperts, dequantize_fp8, fp8_linear, w8a8_default, w8a8_experts_default,
        w8a8_linear_default, w8a16_only)
    from moecluster.kernels.fused_moe_ref import fp8_round_trip

    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(80, 96, generator=gen) * 2).to(torch.float8_e4m3fn).to(device)
    s = (torch.rand(3, 3, generator=gen) * 0.02 + 0.001).to(device)
    x = torch.randn(21, 96, generator=gen).to(device)
    got = fp8_linear(x, w, s, (32, 32), fp8_activations=True, tiles=TileConfig(16, 32, 32, 4, 2))
    want = fp8_round_trip(x, 32) @ dequantize_fp8(w, s, (32, 32), torch.float32).T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # by default: 16-bit activations at prefill-sized batches only, fp32 (the exact test mode) never
    bf16, fp16, fp32 = (torch.zeros(1, device=device, dtype=d) for d in (torch.bfloat16, torch.float16, torch.float32))
    hopper = device.type == "cpu" or torch.cuda.get_device_capability(device) >= (9, 0)
    assert w8a8_default(W8A8_MIN_ROWS, bf16) == hopper and not w8a8_default(W8A8_MIN_ROWS - 1, bf16)
    assert not w8a8_default(10**6, fp32)
    assert w8a8_default(W8A8_LINEAR_MIN_ROWS, fp16, W8A8_LINEAR_MIN_ROWS) == hopper
    assert w8a8_linear_default(W8A8_LINEAR_MIN_ROWS, bf16) == hopper and not w8a8_linear_default(W8A8_LINEAR_MIN_ROWS - 1, bf16)
    assert not w8a8_default(10**6, bf16, block_in=96) and not w8a8_default(10**6, bf16, block_in=16)
    with w8a16_only():  # the decode graphs' warm-up and capture
        assert not w8a8_default(10**6, bf16) and not w8a8_experts_default(10**6, bf16)
        assert not w8a8_linear_default(10**6, bf16)
    with w8a16_only(experts_w8a8=True):  # decode_experts_w8a8: routed experts at any rows, linears not
        assert w8a8_experts_default(1, bf16) == hopper and not w8a8_default(10**6, bf16)
        assert not w8a8_linear_default(10**6, bf16)
        assert not w8a8_experts_default(1, fp32) and not w8a8_experts_default(1, bf16, block_in=96)
    with w8a16_only(linears_w8a8=True):  # decode_linears_w8a8: linears from W8A8_DECODE_LINEAR_MIN_ROWS, experts not
        assert w8a8_linear_default(W8A8_DECODE_LINEAR_MIN_ROWS, bf16) == hopper and not w8a8_experts_default(1, bf16)
        assert not w8a8_linear_default(W8A8_DECODE_LINEAR_MIN_ROWS - 1, bf16) and not w8a8_linear_default(10**6, fp32)
    # outside the decode graphs linears keep the prefill threshold
    assert W8A8_DECODE_LINEAR_MIN_ROWS < W8A8_LINEAR_MIN_ROWS and not w8a8_linear_default(W8A8_LINEAR_MIN_ROWS - 1, bf16)
    assert w8a8_default(10**6, bf16) == hopper and not w8a8_experts_default(1, bf16)
    assert w8a8_experts_default(W8A8_MIN_ROWS, bf16) == hopper
    with pytest.raises(ValueError, match="power of two >= 32"):
        fp8_linear(x, w, torch.ones(3, 6, device=device), (32, 16), fp8_activations=True)
    dense = DenseExperts(*(torch.randn(1, a, b, device=device) for a, b in ((32, 64), (32, 64), (64, 32))))
    with pytest.raises(ValueError, match="Fp8Experts"):
        grouped_mlp(torch.randn(4, 64, device=device), [4], dense, fp8_activations=True)


@pytest.mark.gpu
def test_fp8_w8a8_deepseek_shape_bf16() -> None:
    """DeepSeek-V3 shapes in bf16 at prefill-sized counts: the default (W8A8) near its reference."""
    w, x, c = deepseek_case([300, 64, 1, 200], seed=2)
    got = grouped_mlp(x, c, w).float()  # mean 141 rows per expert: W8A8 by default
    want = grouped_mlp_reference(x, c, w, fp8_activations=True).float()
    exact = grouped_mlp_reference(x, c, w, fp8_activations=False).float()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    # h differs from the reference's by accumulation order and bf16 rounding (~0.3%); quantizing it
    # to e4m3 turns that into whole e4m3 steps for the values near a rounding boundary (1.7% on
    # the interpreter at a small shape), so the kernel is held to the reference's own error against
    # the unquantized MLP instead of to the reference itself.
    assert rel(got, want) < 0.03
    assert 0.01 < rel(got, exact) < 1.1 * rel(want, exact) + 1e-3, (rel(got, exact), rel(want, exact))


@pytest.mark.gpu
def test_fp8_w8a8_captures_in_a_cuda_graph() -> None:
    """W8A8 (asked for explicitly) in a CUDA graph: the quantization pass and both GEMMs capture
    and replay, equal to eager; under `w8a16_only` (how the decode graphs capture) the default is
    W8A16."""
    gen = torch.Generator().manual_seed(5)
    dev = torch.device("cuda")
    from moecluster.kernels.fused_moe import W8A8_LINEAR_MIN_ROWS, fp8_linear, w8a16_only

    w = (torch.randn(512, 384, generator=gen) * 2).to(torch.float8_e4m3fn).to(dev)
    s = (torch.rand(4, 3, generator=gen) * 0.02 + 0.001).to(dev)
    experts = fp8_experts(4, 256, 256, (128, 128), dev, gen)
    counts = torch.tensor([100, 0, 300, 60], dtype=torch.int32, device=dev)  # mean 115: W8A8
    x = torch.randn(max(W8A8_LINEAR_MIN_ROWS, 460), 384, generator=gen).to(dev, torch.bfloat16)
    xe = torch.randn(460, 256, generator=gen).to(dev, torch.bfloat16)

    def run_all() -> tuple[torch.Tensor, ...]:
        return (fp8_linear(x, w, s, fp8_activations=True), grouped_mlp(xe, counts, experts, fp8_activations=True),
                fp8_linear(x, w, s), fp8_linear(x, w, s, fp8_activations=False))

    want = run_all()
    assert not torch.equal(want[2], want[3])  # eager default at these rows: W8A8
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), w8a16_only():  # warm (compiles) off the capture
        run_all()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), w8a16_only():
        got = run_all()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[3])  # the default under w8a16_only: W8A16


@pytest.mark.gpu
def test_fp8_linear_split_k_captures_in_a_cuda_graph() -> None:
    """The decode graphs' W8A16 linears at decode rows split K by default (few column blocks):
    the partial buffer and the sum after capture and replay equal to eager, and to one split."""
    from moecluster.kernels.device import cuda_sm_count
    from moecluster.kernels.fused_moe import TileConfig, fp8_linear, w8a16_only
    from moecluster.kernels.moe_tiles import linear_split_k, linear_tiles

    gen = torch.Generator().manual_seed(6)
    dev = torch.device("cuda")
    tiles, waves = linear_tiles(32)
    assert linear_split_k(-(-576 // tiles.block_n), -(-7168 // tiles.block_k), cuda_sm_count(dev), waves) > 1
    w = (torch.randn(576, 7168, generator=gen) * 2).to(torch.float8_e4m3fn).to(dev)  # DeepSeek-V3's kv_a
    s = (torch.rand(5, 56, generator=gen) * 0.02 + 0.001).to(dev)
    x = torch.randn(32, 7168, generator=gen).to(dev, torch.bfloat16)
    want = fp8_linear(x, w, s, fp8_activations=False)
    whole = fp8_linear(x, w, s, fp8_activations=False, tiles=TileConfig(32, 64, 128, 4, 4, split_k=1))
    torch.testing.assert_close(want, whole, rtol=1e-2, atol=1e-2)  # fp32 partials vs one accumulator, bf16 out
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), w8a16_only():
        got = fp8_linear(x, w, s)
    x.copy_(torch.randn(32, 7168, generator=gen).to(dev, torch.bfloat16))  # new inputs, same buffers
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, fp8_linear(x, w, s, fp8_activations=False))


@pytest.mark.gpu
def test_fp8_linear_w8a8_decode_tiles_split_and_capture() -> None:
    """`decode_linears_w8a8`: at decode rows the W8A8 linear takes the decode tiles and splits K
    where the grid is small (kv_a, 7168 -> 576) but not for a short K on a fuller grid
    (shared_down, 2048 -> 7168); captured under `w8a16_only(linears_w8a8=True)` it replays equal
    to eager W8A8, and within e4m3 activation rounding of W8A16."""
    from moecluster.kernels.device import cuda_sm_count
    from moecluster.kernels.fused_moe import fp8_linear, w8a16_only
    from moecluster.kernels.moe_tiles import W8A8_SHORT_K_STEPS, linear_split_k, w8a8_linear_tiles

    gen = torch.Generator().manual_seed(7)
    dev = torch.device("cuda")
    sms = cuda_sm_count(dev)
    for rows in (16, 64):
        tiles, waves = w8a8_linear_tiles(rows)
        assert linear_split_k(-(-576 // tiles.block_n), 56, sms, waves, short_k=W8A8_SHORT_K_STEPS) > 1
        assert linear_split_k(-(-7168 // tiles.block_n), 16, sms, waves, short_k=W8A8_SHORT_K_STEPS) == 1
    for n, k in ((576, 7168), (7168, 2048)):
        w = (torch.randn(n, k, generator=gen) * 2).to(torch.float8_e4m3fn).to(dev)
        s = (torch.rand(-(-n // 128), k // 128, generator=gen) * 0.02 + 0.001).to(dev)
        x = torch.randn(48, k, generator=gen).to(dev, torch.bfloat16)
        want = fp8_linear(x, w, s, fp8_activations=True)
        w16 = fp8_linear(x, w, s, fp8_activations=False)
        assert (want.float() - w16.float()).norm() < 0.08 * w16.float().norm()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), w8a16_only(linears_w8a8=True):  # warm (compiles) off the capture
            fp8_linear(x, w, s)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), w8a16_only(linears_w8a8=True):
            got = fp8_linear(x, w, s)
        x.copy_(torch.randn(48, k, generator=gen).to(dev, torch.bfloat16))  # new inputs, same buffers
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, fp8_linear(x, w, s, fp8_activations=True))
