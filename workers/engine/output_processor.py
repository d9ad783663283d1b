"""Per-sequence output state: incremental text, stop conditions, what a stream may emit.

Text is produced incrementally (never half a UTF-8 character). When stop strings are set, the
last (longest stop string - 1) characters are held back until the next token shows they are not
the start of a stop string, so a stream never sends text that a stop string later removes.
"""

from __future__ import annotations

from collections.abc import Collection

from moecluster.text.detokenizer import Decoder, IncrementalDetokenizer
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.engine.sequence import Sequence


class StopText:
    """A sample's text as it streams: incremental detokenization, stop strings, the held-back tail.

    Shared by the engine's per-sequence state and the driver's resumed samples (`cluster/
    resumed_text.py`), which prime it with the tokens delivered before a failover."""

    def __init__(self, decoder: Decoder, params: SamplingParams) -> None:
        self.params = params
        self.detok = IncrementalDetokenizer(decoder, skip_special_tokens=params.skip_special_tokens)
        # Held back while it could still be the start of a stop string; a stop string therefore
        # never straddles text already sent, and is searched for in the pending text alone.
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.pending = ""

    def add(self, token: int, reason: str | None, stop_reason: int | str | None
            ) -> tuple[str, str | None, int | str | None]:
        """One token, with the finish reason it already has (None: none yet): (text delta to emit,
        finish reason, stop reason), a stop string completed by this token ending it."""
        p = self.params
        self.pending += self.detok.add(token)
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
        hits = [(i, s) for s in self.params.stop if (i := self.pending.find(s)) >= 0]
        return min(hits) if hits else None


class SeqOutputState:
    def __init__(self, seq: Sequence, decoder: Decoder, eos_token_ids: Collection[int]) -> None:
        self.seq, self.eos = seq, eos_token_ids
        self.text = StopText(decoder, seq.params)

    def on_token(self, token: int, length: int) -> tuple[str, str | None, int | str | None]:
        """Account one sampled token, the sequence's `length`-th (prompt included; under
        asynchronous scheduling token_ids may already hold a placeholder past it): (text delta to
        emit, finish reason or None, stop reason)."""
        seq, p = self.seq, self.seq.params
        reason: str | None = None
        stop_reason: int | str | None = None
        if not p.ignore_eos and token in self.eos:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif length >= seq.max_len:
            reason = "length"
        return self.text.add(token, reason, stop_reason)
