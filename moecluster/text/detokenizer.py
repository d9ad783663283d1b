"""Turn a stream of generated token ids into a stream of text deltas.

Byte-level BPE splits multi-byte characters across tokens (one emoji can be three tokens), so
decoding the newest token alone would print replacement characters. Instead we keep two offsets
into the ids (the scheme vLLM uses):

    ids:  [ ...emitted earlier... | prefix_offset ..last emitted.. | read_offset ..pending.. ]

and each step decode `ids[prefix_offset:]` and `ids[prefix_offset:read_offset]`; the text the
longer one has beyond the shorter one is new. While that text ends in U+FFFD (an incomplete UTF-8
sequence) nothing is emitted; the next token usually completes it. Decoding a short window rather
than everything keeps each step O(1) in the length of the output, and starting the window at the
previous emission point gives the decoder the left context that space handling needs.

The concatenated deltas plus `flush()` equal `decode(all ids)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Feed ids one at a time with `add`; each call returns the newly completed text."""

    def __init__(
        self,
        tokenizer: Decoder,
        *,
        skip_special_tokens: bool = True,
        context_ids: Sequence[int] = (),
    ) -> None:
        """`context_ids` (e.g. the prompt's last few ids) only give left context; they are never
        emitted. They must end on a character boundary."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(context_ids)
        self._n_context = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text_parts: list[str] = []
        # Without left context, tokenizers' own streaming decoder does the same job in one call.
        make_stream = getattr(tokenizer, "decode_stream", None)
        self._step = make_stream(skip_special_tokens) if make_stream and not self._ids else None

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it completes ("" while a character is split)."""
        self._ids.append(int(token_id))
        if self._step is not None:
            piece = self._step(int(token_id))
            if piece:
                self._text_parts.append(piece)
            return piece or ""
        return self._emit(final=False)

    def add_many(self, token_ids: Sequence[int]) -> str:
        """Append several ids at once (e.g. an accepted speculative run)."""
        if self._step is not None:
            return "".join(self.add(t) for t in token_ids)
        self._ids.extend(int(t) for t in token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back, replacement characters included."""
        if self._step is not None:
            full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
            sent = self.text
            rest = full[len(sent) :] if full.startswith(sent) else ""
            if rest:
                self._text_parts.append(rest)
            return rest
        return self._emit(final=True)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text_parts)

    @property
    def token_ids(self) -> list[int]:
        """The generated ids (context excluded)."""
        return self._ids[self._n_context :]

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip)
        current = decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip)
        if not final and current.endswith(REPLACEMENT_CHAR):
            return ""  # a multi-byte character is still incomplete
        if len(current) <= len(emitted):
            return ""  # nothing visible yet (e.g. a skipped special token)
        delta = current[len(emitted) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text_parts.append(delta)
        return delta
