"""One generation stream: a prompt plus the tokens sampled so far, and its cache blocks."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from moecluster.workers.engine.block_manager import BlockTable
from moecluster.workers.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    sample_index: int  # which of the request's n samples it is
    token_ids: list[int]  # prompt followed by generated tokens
    prompt_len: int
    params: SamplingParams
    max_len: int  # prompt_len + the most tokens it may generate
    arrival: int  # admission order; lower runs first and is preempted last
    generator: torch.Generator | None = None
    table: BlockTable = field(default_factory=lambda: BlockTable([]))
    num_computed: int = 0  # leading tokens whose latents are in the cache
    num_cached: int = 0  # of those, how many came from the prefix cache at admission
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    forked: bool = False  # n > 1: the siblings were created from this one
    queued_at: float = field(default_factory=time.monotonic)  # when it joined the queue
    queue_time: float | None = None  # seconds from queued_at to its first scheduled step

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
