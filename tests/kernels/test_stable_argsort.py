"""`stable_argsort`: the order and inverse of a stable argsort of expert ids in one launch, equal to
torch's stable argsort (every permutation entry, ties in index order); on the interpreter at small
sizes, on a GPU at decode sizes up to MAX_PAIRS and past it (the reference)."""

from __future__ import annotations

import pytest
import torch

from moecluster.kernels import stable_argsort as sa
from moecluster.kernels.stable_argsort import stable_argsort, stable_argsort_reference


def _check(ids: torch.Tensor) -> None:
    order, inverse = stable_argsort(ids)
    want_order, want_inverse = stable_argsort_reference(ids)
    assert order.dtype == inverse.dtype == torch.int64
    assert torch.equal(order, want_order) and torch.equal(inverse, want_inverse)
    assert torch.equal(ids[order], torch.sort(ids, stable=True).values)
    assert torch.equal(order[inverse], torch.arange(ids.numel(), device=ids.device))


@pytest.mark.parametrize("n, keys", [(1, 4), (7, 3), (64, 8), (200, 48), (513, 384), (130, 1)])
def test_stable_argsort_matches_torch(device, n: int, keys: int) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + keys)
    ids = torch.randint(0, keys, (n,), generator=gen).to(device)
    assert sa.uses_triton(ids)  # the kernel, interpreted on the CPU
    _check(ids)
    _check(ids.to(torch.int32))


def test_stable_argsort_ties_keep_index_order_and_skewed_keys(device) -> None:
    ids = torch.tensor([5, 5, 5, 0, 5, 0, 9, 5] * 20, device=device)  # heavy ties, as routing to few experts
    _check(ids)
    _check(torch.arange(300, 0, -1, device=device))  # all distinct, reversed


def test_past_max_pairs_the_reference_runs(device, monkeypatch) -> None:
    monkeypatch.setattr(sa, "MAX_PAIRS", 16)
    launched = []
    monkeypatch.setattr(sa, "_rank_kernel", type("K", (), {"__getitem__": lambda s, g: launched.append(g)})())
    ids = torch.randint(0, 8, (40,), device=device)
    _check(ids)
    assert not launched  # 40 pairs > 16: torch's argsort, no launch


@pytest.mark.gpu
def test_stable_argsort_at_decode_sizes_on_gpu() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, keys in ((512, 48), (4096, 384), (8192, 256), (8193, 256), (65536, 384)):
        _check(torch.randint(0, keys, (n,), device="cuda", generator=gen))
