"""Per-sequence output state: incremental text, stop conditions, what a stream may emit.

Text is produced incrementally (never half a UTF-8 character). When stop strings are set, the
last (longest stop string - 1) characters are held back until the next token shows they are not
the start of a stop string, so a stream never sends text that a stop string later removes.
"""

from __future__ import annotations

from collections.abc import Collection

from moecluster.text.detokenizer import Decoder, IncrementalDetokenizer
from moecluster.workers.engine.sequence import Sequence


class SeqOutputState:
    def __init__(self, seq: Sequence, decoder: Decoder, eos_token_ids: Collection[int]) -> None:
        p = seq.params
        self.seq, self.eos = seq, eos_token_ids
        self.detok = IncrementalDetokenizer(decoder, skip_special_tokens=p.skip_special_tokens)
        # Held back while it could still be the start of a stop string; a stop string therefore
        # never straddles text already sent, and is searched for in the pending text alone.
        self.hold = max((len(s) for s in p.stop), default=1) - 1
        self.pending = ""

    def on_token(self, token: int, length: int) -> tuple[str, str | None, int | str | None]:
        """Account one sampled token, the sequence's `length`-th (prompt included; under
        asynchronous scheduling token_ids may already hold a placeholder past it): (text delta to
        emit, finish reason or None, stop reason)."""
        seq, p = self.seq, self.seq.params
        self.pending += self.detok.add(token)
        reason: str | None = None
        stop_reason: int | str | None = None
        if not p.ignore_eos and token in self.eos:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif length >= seq.max_len:
            reason = "length"
        if reason is not None:
            self.pending += self.detok.flush()
        if p.stop and (hit := self._find_stop()) is not None:
            index, stop = hit
            reason, stop_reason = "stop", stop
            self.pending = self.pending[: index + len(stop) if p.include_stop_str_in_output else index]
        if reason is not None or self.hold == 0:
            delta, self.pending = self.pending, ""
        else:
            cut = max(0, len(self.pending) - self.hold)
            delta, self.pending = self.pending[:cut], self.pending[cut:]
        return delta, reason, stop_reason

    def _find_stop(self) -> tuple[int, str] | None:
        hits = [(i, s) for s in self.seq.params.stop if (i := self.pending.find(s)) >= 0]
        return min(hits) if hits else None
