"""What generation returns, mirroring vLLM's `RequestOutput` / `CompletionOutput`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token under the model's distribution
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob; the sampled token is always present.
SampleLogprobs = list[dict[int, Logprob]]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False


# The form a rank's outputs travel in to the driver (`ep_rank` outbox, Ray polls): per request
# (request_id, finished, [(index, text, token_ids, cumulative_logprob, logprobs, finish_reason,
# stop_reason)]) in plain tuples (logprobs, when asked for, keep their Logprob entries), without
# the prompt (the driver has it). These pickle in about a tenth of the time of the dataclasses and
# unpickle in half (with the rebuild), and the driver unpickles every token of every stream. The
# tuple follows CompletionOutput's field order (a test holds them together).
WireOutput = tuple[str, bool, list[tuple]]


def to_wire(outs: list[RequestOutput]) -> list[WireOutput]:
    return [(o.request_id, o.finished, [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs,
                                          c.finish_reason, c.stop_reason) for c in o.outputs]) for o in outs]


def from_wire(rows: list[WireOutput]) -> list[RequestOutput]:
    """`to_wire`'s outputs back, with no prompt (None, [])."""
    return [RequestOutput(rid, None, [], [CompletionOutput(*c) for c in cs], finished) for rid, finished, cs in rows]
