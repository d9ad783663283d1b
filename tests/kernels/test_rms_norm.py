"""`rms_norm`: one launch against the torch form (DeepSeek-V3's rounding: normalize in fp32, round,
then the weight in the input's dtype); interpreter at small sizes, a GPU at the model's."""

from __future__ import annotations

import pytest
import torch

from moecluster.kernels.rms_norm import rms_norm, rms_norm_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "dim"), [(1, 16), (5, 96), (3, 200)])
def test_rms_norm_matches_the_torch_form(device, dtype, rows, dim) -> None:
    gen = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, dim, generator=gen) * 3).to(device, dtype)
    w = (torch.rand(dim, generator=gen) + 0.5).to(device, dtype)
    got = rms_norm(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, rms_norm_reference(x, w, 1e-6), rtol=tol, atol=tol)


def test_rms_norm_strided_rows_and_leading_dims(device) -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(4, 80, generator=gen).to(device)
    x = wide[:, :64]  # a column slice (c_kv of kv_a's output): rows strided, values contiguous
    w = torch.rand(64, generator=gen).to(device)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    x3 = torch.randn(2, 3, 64, generator=gen).to(device)
    torch.testing.assert_close(rms_norm(x3, w, 1e-6), rms_norm_reference(x3, w, 1e-6))
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x3, torch.ones(32, device=device), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [7168, 1536, 512])
def test_rms_norm_bf16_at_model_sizes(dim) -> None:
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(64, dim, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.rand(dim, generator=gen) + 0.5).to("cuda", torch.bfloat16)
    got, want = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    # the sum's order differs from torch's: a few values round to the neighbouring bf16
    assert (got.float() - want.float()).abs().max() <= 2 * want.float().abs().max() * 2**-8
    assert (got != want).float().mean() < 0.01
