"""`greedy_logprobs`: first argmax and its logprob in one read of the logits, against the torch
reference (argmax, logsumexp) and log_softmax; on the interpreter at small sizes, on a GPU at
DeepSeek-V3's and Kimi-K2's vocabularies."""

from __future__ import annotations

import pytest
import torch

from moecluster.kernels import greedy_sample
from moecluster.kernels.greedy_sample import greedy_logprobs, greedy_logprobs_reference


def _check(logits: torch.Tensor) -> None:
    tokens, lp = greedy_logprobs(logits)
    want_t, want_lp = greedy_logprobs_reference(logits)
    assert tokens.dtype == torch.int64 and lp.dtype == torch.float32
    assert torch.equal(tokens, want_t)
    full = torch.log_softmax(logits.float(), dim=-1).gather(1, want_t[:, None]).squeeze(1)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_greedy_logprobs_matches_the_reference(device, dtype, monkeypatch) -> None:
    monkeypatch.setattr(greedy_sample, "BLOCK", 64)  # several chunks at an interpreter-sized vocabulary
    gen = torch.Generator().manual_seed(11)
    for rows, vocab in ((1, 64), (5, 300), (3, 1000)):
        logits = (torch.randn(rows, vocab, generator=gen) * 4).to(device, dtype)
        _check(logits)


def test_greedy_logprobs_ties_take_the_first_index_and_padding_is_ignored(device, monkeypatch) -> None:
    monkeypatch.setattr(greedy_sample, "BLOCK", 64)
    logits = torch.full((4, 200), -5.0)
    logits[0, [7, 150]] = 3.0  # tie across chunks: the first chunk's
    logits[1, [70, 71]] = 3.0  # tie inside one chunk: the lower index
    logits[2, 199] = 1.0  # the maximum in the last, partial chunk
    logits[3, :64] = float("-inf")  # a whole chunk masked out
    logits[3, 100] = 2.0
    logits = logits.to(device)
    tokens, lp = greedy_logprobs(logits)
    assert tokens.tolist() == [7, 70, 199, 100]
    torch.testing.assert_close(lp, greedy_logprobs_reference(logits)[1])
    wide = torch.randn(6, 500).to(device)[:, ::2]  # a strided view (copied to contiguous rows first)
    _check(wide)


def test_greedy_logprobs_nan_and_all_inf_rows_as_torch(device, monkeypatch) -> None:
    """A NaN is the maximum, as for torch.argmax (its first index), with a NaN logprob; a row of
    -inf only gives token 0 and a NaN logprob, as log_softmax does; other rows are unaffected."""
    monkeypatch.setattr(greedy_sample, "BLOCK", 64)
    logits = torch.randn(4, 200)
    logits[0, [150, 170]] = float("nan")  # NaNs in a later chunk than the finite maximum
    logits[0, 3] = 100.0
    logits[1, 70] = float("nan")
    logits[2] = float("-inf")
    logits = logits.to(device)
    tokens, lp = greedy_logprobs(logits)
    want_t, want_lp = greedy_logprobs_reference(logits)
    assert tokens.tolist()[:3] == [150, 70, 0] and torch.equal(tokens, want_t)
    assert lp[:3].isnan().all() and want_lp[:3].isnan().all()
    torch.testing.assert_close(lp[3], want_lp[3])


def test_greedy_logprobs_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rows, vocab"):
        greedy_logprobs(torch.zeros(3, dtype=torch.int64).view(3, 1))
    with pytest.raises(ValueError, match="rows, vocab"):
        greedy_logprobs(torch.zeros(3))


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [129280, 163840])
def test_greedy_logprobs_at_model_vocabularies(vocab) -> None:
    gen = torch.Generator().manual_seed(12)
    logits = (torch.randn(64, vocab, generator=gen) * 3).to("cuda", torch.bfloat16)
    _check(logits)
    _check(logits.float())
