"""The typed message a prefill worker sends a decode worker for each request sample it hands over."""

from __future__ import annotations

from dataclasses import dataclass

from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.transfer.kv_transfer import KVTicket


@dataclass(frozen=True)
class KVHandoff:
    request_id: str
    sample_index: int
    prompt: str | None
    prompt_ids: list[int]
    first_token: int  # sampled by the prefill worker, already streamed to the client
    params: SamplingParams
    num_tokens: int  # tokens whose latents travel: the prompt (the first token is not computed yet)
    max_len: int  # the sequence's length budget (prompt + max new tokens, capped by max_model_len)
    ticket: KVTicket
    generator_state: bytes | None = None  # seeded sampling continues exactly where prefill left it
