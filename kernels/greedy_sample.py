"""Greedy sampling's reductions over the logits in one read (GPU): per row the first index of the
maximum and the log-sum-exp, so the chosen token's logprob is max - lse (its rank is 1 by
definition) without writing log_softmax over the vocabulary. The engine's sampler takes it for
steps whose rows are all greedy and ask for no top logprobs (workers/engine/sampler.py); the
general path (log_softmax, argmax, a rank count, each a pass over (rows, vocab) floats) took
about 0.2 ms a step at 64 rows of DeepSeek-V3's 129,280 logits on an H200.

Two launches: (rows, chunks) programs reduce BLOCK logits each to (max, first argmax, sum of
exp(x - max)); one program per row merges its chunks. The torch reference (CPU, and CUDA
without Triton) computes the same from argmax and logsumexp.
"""

from __future__ import annotations

import torch

from moecluster.kernels.jit import jit, triton, uses_triton

if triton is not None:
    import triton.language as tl

BLOCK = 4096  # logits per program of the first pass


def greedy_logprobs_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (rows, vocab) -> (first argmax int64 (rows,), its logprob float32 (rows,))."""
    x = logits.float()
    tokens = x.argmax(dim=-1)
    return tokens, (x.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1))


@jit
def _chunk_kernel(x_ptr, stride_x, vocab, m_ptr, a_ptr, s_ptr, n_chunks, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lane = tl.arange(0, BLOCK)
    offs = chunk * BLOCK + lane
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
    nan = x != x
    # as torch.argmax: a NaN is the maximum (the first NaN's index); the row's logprob is NaN then
    has_nan = tl.max(nan.to(tl.int32), axis=0) > 0
    first_nan = tl.min(tl.where(nan, lane, BLOCK), axis=0)
    x = tl.where(nan, float("-inf"), x)
    m = tl.max(x, axis=0)
    a = tl.argmax(x, axis=0, tie_break_left=True)
    safe = tl.where(m == float("-inf"), 0.0, m)  # a chunk of -inf only sums to 0, not nan
    s = tl.sum(tl.exp(x - safe), axis=0)
    m = tl.where(has_nan, float("nan"), m)
    a = tl.where(has_nan, first_nan, a)
    out = row * n_chunks + chunk
    tl.store(m_ptr + out, m)
    tl.store(a_ptr + out, chunk * BLOCK + a)
    tl.store(s_ptr + out, s)


@jit
def _merge_kernel(m_ptr, a_ptr, s_ptr, tok_ptr, lp_ptr, n_chunks, CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS)
    inside = c < n_chunks
    m = tl.load(m_ptr + row * n_chunks + c, mask=inside, other=float("-inf"))
    s = tl.load(s_ptr + row * n_chunks + c, mask=inside, other=0.0)
    nan = m != m  # chunks holding a NaN
    has_nan = tl.max(nan.to(tl.int32), axis=0) > 0
    first_nan = tl.min(tl.where(nan, c, CHUNKS), axis=0)
    m = tl.where(nan, float("-inf"), m)
    best = tl.max(m, axis=0)
    first = tl.argmax(m, axis=0, tie_break_left=True)  # the first chunk holding the maximum
    token = tl.load(a_ptr + row * n_chunks + tl.where(has_nan, first_nan, first))
    scaled = tl.where(m == float("-inf"), 0.0, s * tl.exp(m - best))
    lp = -tl.log(tl.sum(scaled, axis=0))  # best - (best + log sum)
    # NaN as log_softmax gives: a NaN in the row, or every logit -inf (-inf minus -inf)
    lp = tl.where(has_nan | (best == float("-inf")), float("nan"), lp)
    tl.store(tok_ptr + row, token.to(tl.int64))
    tl.store(lp_ptr + row, lp)


def greedy_logprobs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (rows, vocab) fp32/bf16/fp16 -> (first argmax int64 (rows,), its logprob float32 (rows,)),
    as `greedy_logprobs_reference`; Triton on CUDA, the reference elsewhere."""
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"greedy_logprobs: logits must be (rows, vocab) floats, got {logits.dtype} {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if rows == 0 or not uses_triton(logits):
        return greedy_logprobs_reference(logits)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_chunks = triton.cdiv(vocab, BLOCK)
    part = torch.empty((2, rows, n_chunks), dtype=torch.float32, device=logits.device)  # chunk max, sum of exp
    arg = torch.empty((rows, n_chunks), dtype=torch.int32, device=logits.device)
    _chunk_kernel[(rows, n_chunks)](logits, logits.stride(0), vocab, part[0], arg, part[1], n_chunks, BLOCK=BLOCK)
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    chosen = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _merge_kernel[(rows,)](part[0], arg, part[1], tokens, chosen, n_chunks, CHUNKS=triton.next_power_of_2(n_chunks))
    return tokens, chosen
