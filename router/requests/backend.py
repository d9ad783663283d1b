"""The front end's view of what serves requests: typed messages in and out, and the protocol.

The router never imports torch or ray; the cluster layer implements `Backend` over a deployment
(Ray actors), and the benchmarks over a fast fake engine. Calls into a backend are synchronous
and quick (they queue work); deltas come back through the request's `sink`, from any thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from moecluster.router.requests.placement import RankView, Target


class Overloaded(RuntimeError):
    """The backend's queues are full; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token


@dataclass(slots=True)
class ChoiceDelta:
    """New output of one sample since its previous delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[list[TokenLogprob]] | None = None  # per new token: the sampled token first, then top-k
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None


@dataclass(slots=True)
class Delta:
    request_id: str
    choices: list[ChoiceDelta]
    finished: bool  # every sample has finished


Sink = Callable[["Delta | BaseException"], None]


@dataclass(frozen=True)
class ModelInfo:
    name: str  # the served name clients ask for
    root: str  # checkpoint directory
    max_model_len: int
    block_size: int  # of the prefix cache, for the block-hash chain placement matches against
    model_type: str = ""  # config.json model_type (picks the tool-call format)


@dataclass(frozen=True)
class ReplicaState:
    name: str
    role: str
    healthy: bool
    open_requests: int
    ranks: list[dict[str, Any]] = field(default_factory=list)  # rank, alive, running, waiting, kv_usage, ...


class Backend(Protocol):
    model: ModelInfo

    def submit(
        self, request_id: str, prompt_ids: list[int], sampling: dict[str, Any], sink: Sink,
        prompt: str | None = None, target: Target | None = None,
    ) -> None:
        """Queue a request (on `target`, the entry pool's (replica, rank), when given and healthy).
        Raises ValueError naming the bad field, or Overloaded."""

    def abort(self, request_id: str) -> bool: ...

    def rank_views(self) -> Sequence[RankView]:
        """The entry pool's DP ranks, for placement (cheap: cached between health refreshes)."""

    def status(self) -> tuple[list[ReplicaState], int, int]:
        """(replicas, open requests, failovers so far)."""
