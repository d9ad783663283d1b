"""Batched sampling on the logits' device: greedy, temperature, top-k, top-p, min-p, logprobs.

Every filter works on the whole (rows, vocab) batch at once. Randomness uses the
exponential-race form (argmax of p / E with E ~ Exp(1)) so that a row with its own seed draws its
noise from its own generator: the only per-row work is that draw, never a loop over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecluster.kernels.greedy_sample import greedy_logprobs, greedy_logprobs_reference


GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device` without the host waiting for the device: on a GPU through pinned
    memory and a non-blocking copy (a step may still be in flight), elsewhere a plain copy."""
    return host.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else host.to(device)


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling settings for one step; tensors live on the logits' device."""

    temperature: torch.Tensor  # (rows,) float32; 0 means greedy
    top_k: torch.Tensor  # (rows,) int64; vocab size means no top-k
    top_p: torch.Tensor  # (rows,) float32
    min_p: torch.Tensor  # (rows,) float32
    generators: tuple[torch.Generator | None, ...]  # per row: its own seeded generator, or None
    num_logprobs: int  # the largest `logprobs` any row asked for (0: none)
    all_greedy: bool
    # decided on the host from the settings: a test of the device tensors would wait for the step
    needs_sort: bool  # some row has top-k or top-p
    any_min_p: bool

    @classmethod
    def build(
        cls,
        temperature: list[float],
        top_k: list[int],
        top_p: list[float],
        min_p: list[float],
        generators: list[torch.Generator | None],
        num_logprobs: int,
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatch:
        k = [vocab_size if v <= 0 else min(v, vocab_size) for v in top_k]
        # A vanishing temperature is greedy, as in vLLM: dividing the logits by one (1e-38)
        # overflows them to inf, and the NaN softmax would draw token 0 every time.
        temperature = [0.0 if t < GREEDY_BELOW else t for t in temperature]
        # One (4, rows) float32 block, one copy: on a GPU from pinned memory without blocking, so
        # building the batch after the forward was launched does not wait for it (top-k values are
        # exact in float32 up to 2^24, far above any vocabulary).
        host = torch.tensor([temperature, k, top_p, min_p], dtype=torch.float32).view(4, len(temperature))
        block = to_device(host, device)
        return cls(
            temperature=block[0],
            top_k=block[1].long(),
            top_p=block[2],
            min_p=block[3],
            generators=tuple(generators),
            num_logprobs=num_logprobs,
            all_greedy=all(t == 0.0 for t in temperature),
            # from the float32 host block, so they agree with what the device compares
            needs_sort=bool((host[1] < vocab_size).any() or (host[2] < 1.0).any()),
            any_min_p=bool((host[3] > 0).any()),
        )


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # (rows,) int64
    logprobs: torch.Tensor  # (rows,) float32, log-probability of the sampled token
    ranks: torch.Tensor  # (rows,) int64, its rank under the model's distribution (1 = best)
    top_ids: torch.Tensor | None  # (rows, num_logprobs) int64
    top_logprobs: torch.Tensor | None  # (rows, num_logprobs) float32


@dataclass(frozen=True)
class HostSamples:
    """A step's samples on their way to host memory: read them after `wait()`."""

    out: SamplerOutput  # host tensors (pinned on a GPU), filled once the copies are done
    done: torch.cuda.Event | None  # recorded after the copies; None when they were synchronous

    def wait(self) -> SamplerOutput:
        if self.done is not None:
            self.done.synchronize()  # this step's samples only, not what was queued after them
        return self.out


def to_host(out: SamplerOutput) -> HostSamples:
    """Start copying a step's samples to host memory without waiting for the device. Reading a
    device tensor (`.tolist()`) would wait for everything queued on the stream, a step launched
    after this one included, which is what asynchronous scheduling must not do."""
    if out.token_ids.device.type != "cuda":
        return HostSamples(out, None)

    def copy(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

    host = SamplerOutput(*(copy(t) for t in (out.token_ids, out.logprobs, out.ranks, out.top_ids, out.top_logprobs)))
    done = torch.cuda.Event()
    done.record()
    return HostSamples(host, done)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """logits (rows, vocab) float32 -> sampled tokens with their logprobs under the raw model.
    All rows greedy and no top logprobs asked: one read of the logits (`greedy_logprobs` on CUDA,
    its torch reference elsewhere; the greedy token's rank is 1)."""
    if batch.all_greedy and not batch.num_logprobs:
        tokens, chosen_lp = greedy_logprobs(logits) if logits.is_cuda else greedy_logprobs_reference(logits)
        return SamplerOutput(tokens, chosen_lp, torch.ones_like(tokens), None, None)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    greedy = logits.argmax(dim=-1)
    tokens = greedy if batch.all_greedy else torch.where(batch.temperature == 0, greedy, _sample_random(logits, batch))
    chosen = logprobs.gather(1, tokens[:, None])  # (rows, 1)
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_ids = top_lp = None
    if batch.num_logprobs:
        top_lp, top_ids = logprobs.topk(batch.num_logprobs, dim=-1)
    return SamplerOutput(tokens, chosen.squeeze(1), ranks, top_ids, top_lp)


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    temperature = torch.where(batch.temperature == 0, 1.0, batch.temperature)
    scaled = logits.float() / temperature[:, None]
    probs = torch.softmax(_filter(scaled, batch), dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, gen in enumerate(batch.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return (probs / noise.clamp_min_(1e-30)).argmax(dim=-1)


def _filter(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask (set to -inf) what top-k, top-p and min-p exclude; rows keep at least their best token."""
    vocab = scaled.shape[-1]
    if batch.needs_sort:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        position = torch.arange(vocab, device=scaled.device)[None, :]
        drop = position >= batch.top_k[:, None]
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= batch.top_p[:, None]
        drop[:, 0] = False
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    if batch.any_min_p:
        probs = torch.softmax(scaled, dim=-1)
        floor = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        scaled = scaled.masked_fill(probs < floor, float("-inf"))
    return scaled
