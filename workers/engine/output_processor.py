"""Per-sequence output state: incremental text, stop conditions, what a stream may emit.

Text is produced incrementally (never half a UTF-8 character). When stop strings are set, the
last (longest stop string - 1) characters are held back until the next token shows they are not
the start of a stop string, so a stream never sends text that a stop string later removes.
"""

from __future__ import annotations

from collections.abc import Collection

from moecluster.workers.detokenizer import Decoder, IncrementalDetokenizer
from moecluster.workers.engine.sequence import Sequence


class SeqOutputState:
    def __init__(self, seq: Sequence, decoder: Decoder, eos_token_ids: Collection[int]) -> None:
        p = seq.params
        self.seq, self.eos = seq, eos_token_ids
        self.detok = IncrementalDetokenizer(decoder, skip_special_tokens=p.skip_special_tokens)
        self.hold = max((len(s) for s in p.stop), default=1) - 1
        self.sent = 0  # characters of text already emitted

    def on_token(self, token: int) -> tuple[str, str | None, int | str | None]:
        """Account one appended token: (text delta to emit, finish reason or None, stop reason)."""
        seq, p = self.seq, self.seq.params
        self.detok.add(token)
        reason: str | None = None
        stop_reason: int | str | None = None
        if not p.ignore_eos and token in self.eos:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif len(seq.token_ids) >= seq.max_len:
            reason = "length"
        if reason is not None:
            self.detok.flush()
        text = self.detok.text
        end = len(text) if reason is not None else max(self.sent, len(text) - self.hold)
        if p.stop:
            hit = self._find_stop(text)
            if hit is not None:
                index, stop = hit
                reason, stop_reason = "stop", stop
                end = index + len(stop) if p.include_stop_str_in_output else index
        delta = text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta, reason, stop_reason

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        start = max(0, self.sent - self.hold)  # a stop string may straddle what was already sent
        hits = [(i, s) for s in self.seq.params.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    @property
    def text(self) -> str:
        return self.detok.text[: self.sent]
