"""One generation stream: a prompt plus the tokens sampled so far, and its cache blocks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moecluster.workers.engine.outputs import Logprob
from moecluster.workers.engine.sampling_params import SamplingParams


@dataclass
class Sequence:
    seq_id: int
    request_index: int  # which request of the batch it belongs to
    sample_index: int  # which of the request's n samples it is
    token_ids: list[int]  # prompt followed by generated tokens
    prompt_len: int
    params: SamplingParams
    max_len: int  # prompt_len + the most tokens it may generate
    generator: torch.Generator | None = None
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose latents are already in the cache
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def new_tokens(self) -> list[int]:
        return self.token_ids[self.num_computed :]
