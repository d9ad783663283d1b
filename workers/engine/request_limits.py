"""What a replica can accept, checked before a request costs anything (also by whoever routes to it)."""

from __future__ import annotations

from dataclasses import dataclass

from moecluster.workers.engine.sampling_params import SamplingParams

GENERATOR_SEED_MIN, GENERATOR_SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


class RequestError(ValueError):
    """A request the engine refuses before it costs anything; the message says why."""


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int
    vocab_size: int
    capacity_tokens: int  # tokens the KV cache holds
    max_num_seqs: int

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Raise RequestError naming the problem, or return the request's sequence length budget."""
        n, limit = len(prompt_ids), self.max_model_len
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= limit:
            raise RequestError(f"prompt of {n} tokens does not fit max_model_len {limit} with room to generate")
        vocab = self.vocab_size
        bad = next((t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        # Sample i seeds its generator with seed + i inside a step, in the engine's thread: a value
        # the generator refuses would fail there, and with it every request of the engine.
        if params.seed is not None and not (
            GENERATOR_SEED_MIN <= params.seed and params.seed + params.n - 1 <= GENERATOR_SEED_MAX
        ):
            raise RequestError(f"seed {params.seed} (+ up to {params.n - 1} for the samples) is outside "
                               f"[{GENERATOR_SEED_MIN}, {GENERATOR_SEED_MAX}]")
        if params.n > self.max_num_seqs:
            raise RequestError(f"n={params.n} samples exceed max_num_seqs {self.max_num_seqs}")
        if params.max_tokens is None:  # "as long as it fits": the context length, or what one cache holds
            max_len = min(limit, self.capacity_tokens)
            if n >= max_len:
                raise RequestError(f"prompt of {n} tokens leaves no room to generate in a KV cache of "
                                   f"{self.capacity_tokens} tokens")
            return max_len
        max_len = min(n + params.max_tokens, limit)
        if max_len > self.capacity_tokens:
            raise RequestError(
                f"prompt of {n} tokens plus up to {max_len - n} new tokens needs more than the "
                f"{self.capacity_tokens} tokens the KV cache holds"
            )
        return max_len
