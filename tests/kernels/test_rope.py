"""`rope`: one launch against the torch form in fp32 rounded once (and within one unit in the
last place of the torch form in x's dtype), both pair layouts, q-like (many heads, a strided
view of a projection's output) and k-like (one head) inputs; interpreter and GPU."""

from __future__ import annotations

import pytest
import torch

from moecluster.kernels.rope import rope, rope_reference


# bounds relative to the largest input (clamped to >= 1): each output is a difference of two
# products of up to that size, rounded; a few units in the last place of the dtype at that size
# (fp32: the GPU's FMAs against torch's separate products), far below a wrong pair or sign
ULP = {torch.float32: 2.0**-20, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> None:
    got = rope(x, cos, sin, interleaved)
    assert got.shape == x.shape and got.dtype == x.dtype
    if x.numel() == 0:
        return
    scale = max(float(x.float().abs().max()), 1.0)
    exact = rope_reference(x.float(), cos.float(), sin.float(), interleaved)
    assert (got.float() - exact).abs().max() <= ULP[x.dtype] * scale
    torch_form = rope_reference(x, cos, sin, interleaved).float()
    assert (got.float() - torch_form).abs().max() <= 2 * ULP[x.dtype] * scale
    # the pairs really rotate: a wrong layout is far off
    swapped = rope_reference(x.float(), cos.float(), sin.float(), not interleaved)
    if x.shape[-1] > 2:
        assert (got.float() - swapped).abs().max() > 16 * ULP[x.dtype] * scale


def _angles(tokens: int, half: int, dtype: torch.dtype, device, gen) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    a = torch.rand(tokens, half, generator=gen) * 50
    return a.cos().to(device, dtype).unsqueeze(1), a.sin().to(device, dtype).unsqueeze(1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_matches_the_torch_form(device, interleaved, dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    for tokens, heads, dim in ((1, 1, 8), (5, 3, 16), (4, 6, 64), (0, 4, 16), (3, 37, 16)):  # 37: 3 head blocks
        proj = torch.randn(tokens, heads, 24 + dim, generator=gen).to(device, dtype)
        x = proj[..., 24:]  # the rope part of a projection: rows strided, values contiguous
        cos, sin = _angles(tokens, dim // 2, dtype, device, gen)
        _check(x, cos, sin, interleaved)


def test_rope_head_blocks_cover_every_head(device, monkeypatch) -> None:
    """Blocks of 4 heads over 6 and 9 heads: each token's programs split the heads, the last block partial."""
    from moecluster.kernels import rope as rope_module

    monkeypatch.setattr(rope_module, "HEAD_BLOCK", 4)
    gen = torch.Generator().manual_seed(5)
    for tokens, heads in ((4, 6), (2, 9)):
        x = torch.randn(tokens, heads, 16, generator=gen).to(device)
        cos, sin = _angles(tokens, 8, torch.float32, device, gen)
        _check(x, cos, sin, True)


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
        _check(x, cos, sin, interleaved)
