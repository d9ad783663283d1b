"""The text of a sample that failed over, continued as the replica it started on would have.

A resumed sample runs on its new replica as prompt + the tokens it had delivered. That engine's
detokenizer starts empty, so what the old replica had decoded and not yet sent is lost: the bytes
of a character split across tokens (byte-level BPE: one CJK character or emoji can be two or three
tokens), and the text held back because it might begin a stop string. Its stop-string search also
sees only the new text, so a stop string straddling the resume point would be missed.

`ResumedText` rebuilds that state on the driver from the delivered tokens and how much text was sent
(the engine's own `StopText`, primed with them), then turns the new replica's
tokens into the text the client would have seen without the failure, finishing the sample itself
when a stop string completes across the resume point.
"""

from __future__ import annotations

from dataclasses import dataclass

from moecluster.text.detokenizer import Decoder
from moecluster.workers.engine.output_processor import StopText
from moecluster.workers.engine.sampling_params import SamplingParams


@dataclass
class Piece:
    text: str
    kept: int  # how many of the fed tokens belong to the sample (fewer when a stop string ended it)
    finish_reason: str | None
    stop_reason: int | str | None


class ResumedText:
    def __init__(self, decoder: Decoder, params: SamplingParams, delivered: list[int], sent_chars: int) -> None:
        self.text = StopText(decoder, params)
        self.text.detok.add_many(delivered)
        # What the failed replica had decoded and not sent (held back): the client still needs it.
        # The text sent is a prefix of the same tokens' decoding (same tokenizer and settings).
        self.text.pending = self.text.detok.text[sent_chars:]

    def feed(self, token_ids: list[int], finish_reason: str | None, stop_reason: int | str | None) -> Piece:
        """The text of these new tokens; `finish_reason` / `stop_reason` are the engine's for the last."""
        out = []
        for k, token in enumerate(token_ids):
            last = k == len(token_ids) - 1
            delta, reason, why = self.text.add(token, *((finish_reason, stop_reason) if last else (None, None)))
            out.append(delta)
            if reason is not None:
                return Piece("".join(out), k + 1, reason, why)
        return Piece("".join(out), len(token_ids), finish_reason, stop_reason)
