"""`rope`: one launch against the torch form, both pair layouts, q-like (many heads, a strided
view of a projection's output) and k-like (one head) inputs; interpreter and GPU."""

from __future__ import annotations

import pytest
import torch

from moecluster.kernels.rope import rope, rope_reference


def _angles(tokens: int, half: int, dtype: torch.dtype, device, gen) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    a = torch.rand(tokens, half, generator=gen) * 50
    return a.cos().to(device, dtype).unsqueeze(1), a.sin().to(device, dtype).unsqueeze(1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_matches_the_torch_form(device, interleaved, dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    for tokens, heads, dim in ((1, 1, 8), (5, 3, 16), (4, 6, 64)):
        proj = torch.randn(tokens, heads, 24 + dim, generator=gen).to(device, dtype)
        x = proj[..., 24:]  # the rope part of a projection: rows strided, values contiguous
        cos, sin = _angles(tokens, dim // 2, dtype, device, gen)
        got = rope(x, cos, sin, interleaved)
        assert got.shape == x.shape and got.dtype == dtype
        torch.testing.assert_close(got, rope_reference(x, cos, sin, interleaved), rtol=0, atol=0)


def test_rope_rejects_bad_shapes(device) -> None:
    x = torch.zeros(2, 3, 8, device=device)
    with pytest.raises(ValueError, match="even dim"):
        rope(torch.zeros(2, 3, 7, device=device), torch.zeros(2, 1, 3, device=device), torch.zeros(2, 1, 3, device=device), True)
    with pytest.raises(ValueError, match="per token"):
        rope(x, torch.zeros(3, 1, 4, device=device), torch.zeros(3, 1, 4, device=device), True)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [128, 64, 1])
def test_rope_bf16_at_model_sizes(heads) -> None:
    gen = torch.Generator().manual_seed(heads)
    proj = torch.randn(64, heads, 192, generator=gen).to("cuda", torch.bfloat16)
    x = proj[..., 128:]
    cos, sin = _angles(64, 32, torch.bfloat16, "cuda", gen)
    for interleaved in (True, False):
        assert torch.equal(rope(x, cos, sin, interleaved), rope_reference(x, cos, sin, interleaved))
