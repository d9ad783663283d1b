"""Handoffs waiting for a decode engine to take them: retried while blocks are short, then received.

A handoff the decode engine cannot admit yet (no free blocks or running slots) stays queued and
is offered again on the next `deliver`, while the prefill side keeps holding its blocks. A
transfer that fails is retried up to `max_retries` times; after that the sample is prefilled
again on the decode engine from its prompt and first token ("refilled"). Either way the prefill
side may free its copy once `deliver` reports the handoff taken.

Used by the in-process `DisaggregatedCore` and by decode ranks of a cluster's decode replicas.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Literal

from moecluster.workers.engine.engine_core import EngineCore
from moecluster.workers.transfer.handoff import KVHandoff
from moecluster.workers.transfer.kv_transfer import TransferError

Outcome = Literal["received", "refilled"]


@dataclass(frozen=True)
class Taken:
    handoff: KVHandoff
    inner_id: str  # the request id the decode engine runs the sample under
    outcome: Outcome


class HandoffQueue:
    def __init__(self, decode: EngineCore, max_retries: int = 2) -> None:
        self.decode, self.max_retries = decode, max_retries
        self._waiting: deque[tuple[KVHandoff, str]] = deque()
        self._failures: dict[str, int] = {}
        self.num_refills = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def offer(self, handoff: KVHandoff, inner_id: str) -> None:
        self._waiting.append((handoff, inner_id))

    def drop(self, predicate: Callable[[KVHandoff, str], bool]) -> list[KVHandoff]:
        """Forget the waiting handoffs the predicate selects (an abort); returns them."""
        kept: deque[tuple[KVHandoff, str]] = deque()
        dropped: list[KVHandoff] = []
        for h, inner_id in self._waiting:
            if predicate(h, inner_id):
                dropped.append(h)
                self._failures.pop(inner_id, None)
            else:
                kept.append((h, inner_id))
        self._waiting = kept
        return dropped

    def deliver(self) -> list[Taken]:
        """Offer every waiting handoff once, in arrival order; those the decode engine took."""
        taken: list[Taken] = []
        waiting: deque[tuple[KVHandoff, str]] = deque()
        while self._waiting:
            h, inner_id = self._waiting.popleft()
            try:
                outcome: Outcome | None = "received" if self.decode.add_prefilled(h, inner_id) else None
            except TransferError:
                self._failures[inner_id] = self._failures.get(inner_id, 0) + 1
                if self._failures[inner_id] <= self.max_retries:
                    waiting.append((h, inner_id))
                    continue
                self._refill(h, inner_id)
                outcome = "refilled"
            if outcome is None:
                waiting.append((h, inner_id))
                continue
            self._failures.pop(inner_id, None)
            taken.append(Taken(h, inner_id, outcome))
        self._waiting = waiting
        return taken

    def _refill(self, h: KVHandoff, inner_id: str) -> None:
        """Give up on the transfer: the decode engine recomputes prompt + first token itself."""
        self.num_refills += 1
        left = None if h.params.max_tokens is None else h.params.max_tokens - 1
        params = h.params.model_copy(update={"n": 1, "max_tokens": left, "seed": None})
        self.decode.add_request(inner_id, [*h.prompt_ids, h.first_token], params, h.prompt)
