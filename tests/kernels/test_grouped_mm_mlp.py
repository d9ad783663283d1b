"""bf16 experts at prefill sizes through `torch._grouped_mm` (kernels/grouped_mm_mlp.py): the fused
SiLU-and-mul pass against torch (the interpreter on the CPU), which calls take the path, and on a
Hopper GPU its output against the reference and the Triton kernel, gathered rows included."""

from __future__ import annotations

import pytest
import torch

from moecluster.kernels import fused_moe as fm
from moecluster.kernels import grouped_mm_mlp as gm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 96), (33, 2050)])
def test_silu_and_mul_equals_torch(device: torch.device, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    if device.type == "cpu":
        pytest.importorskip("triton")
    g = torch.randn(shape, device=device, dtype=dtype) * 4
    u = torch.randn(shape, device=device, dtype=dtype)
    want = (torch.nn.functional.silu(g.float()) * u.float()).to(dtype)
    got = gm.silu_and_mul(g, u)
    torch.testing.assert_close(got, want, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-5 if dtype == torch.float32 else 2e-3)


def test_silu_and_mul_refuses_mismatched_or_strided_inputs() -> None:
    g = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="contiguous"):
        gm.silu_and_mul(g, torch.zeros(4, 9))
    with pytest.raises(ValueError, match="contiguous"):
        gm.silu_and_mul(g, torch.zeros(8, 4).t())


def test_not_taken_on_the_cpu_or_for_small_batches() -> None:
    w = fm.DenseExperts(*(torch.zeros(2, 8, 16, dtype=torch.bfloat16) for _ in range(2)), torch.zeros(2, 16, 8, dtype=torch.bfloat16))
    x = torch.zeros(10_000, 16, dtype=torch.bfloat16)
    assert not gm.supported(x, w, x.shape[0])  # the CPU
    if torch.cuda.is_available():
        xg, wg = x.cuda(), fm.DenseExperts(w.gate.cuda(), w.up.cuda(), w.down.cuda())
        assert not gm.supported(xg, wg, gm.MIN_ROWS_PER_EXPERT * 2 - 1)  # below the threshold
        assert not gm.supported(xg.half(), wg, xg.shape[0])  # fp16 keeps the Triton kernel


@pytest.mark.gpu
@pytest.mark.parametrize("gather", [False, True])
def test_prefill_sized_bf16_takes_grouped_mm_and_matches(monkeypatch, gather: bool) -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0) or not hasattr(torch, "_grouped_mm"):
        pytest.skip("needs a Hopper GPU and torch._grouped_mm")
    device = torch.device("cuda")
    e, h, i = 4, 1024, 512
    torch.manual_seed(0)
    gate, up = (torch.randn(e, i, h, device=device) / h**0.5 for _ in range(2))
    down = torch.randn(e, h, i, device=device) / i**0.5
    w = fm.DenseExperts(gate.bfloat16(), up.bfloat16(), down.bfloat16())
    counts = torch.tensor([700, 0, 1417, 307], device=device, dtype=torch.int32)  # uneven, one empty; 606 a mean
    rows = int(counts.sum())
    if gather:
        x = torch.randn(rows // 2 + 1, h, device=device, dtype=torch.bfloat16)
        src = torch.randint(0, x.shape[0], (rows,), device=device)
        dense_x = x[src]
    else:
        x, src = torch.randn(rows, h, device=device, dtype=torch.bfloat16), None
        dense_x = x
    calls = []
    real = gm.grouped_mlp
    monkeypatch.setattr(gm, "grouped_mlp", lambda *a: calls.append(1) or real(*a))
    got = fm.grouped_mlp(x, counts, w, src_rows=src)
    assert calls, "the grouped GEMM path did not run"
    ref = fm.grouped_mlp_reference(dense_x, counts.tolist(), w)
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)
    assert (got.float() - ref.float()).norm() / ref.float().norm() < 1e-2
    gu, dn = fm.default_tiles(rows, w, torch.bfloat16)
    triton_out = fm.grouped_mlp(x, counts, w, src_rows=src, gate_up_tiles=gu, down_tiles=dn)  # explicit tiles: Triton
    assert len(calls) == 1
    assert (got.float() - triton_out.float()).norm() / triton_out.float().norm() < 1e-2
