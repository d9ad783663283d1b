"""Split a thinking model's `<think>...</think>` reasoning out of its generated text.

DeepSeek-R1 and Kimi-K2-Thinking write their chain of thought first, between `<think>` and
`</think>`, and then the answer. OpenAI-compatible servers return the first part as
`reasoning_content` and the rest as `content`:

    output:  [ws] <think> reasoning </think> [ws] content
               ^ dropped                      ^ dropped

Rules (the streaming and the one-shot form follow the same ones):

- Reasoning opens only at the very start of the output (leading whitespace aside): models open
  it there or not at all, so a `<think>` anywhere later is plain text, and so is a `<think>`
  inside the reasoning.
- Some chat templates end the prompt with `<think>` already (`starts_in_reasoning=True`): then
  the output starts inside the reasoning. A `<think>` the model writes anyway at the start is
  swallowed, so the same splitter works whether or not the template opened the block.
- After `</think>` everything is content. The whitespace run between `</think>` and the first
  character of the content is dropped (models write `</think>\\n\\n`; clients should not see an
  answer that starts with blank lines). The reasoning is returned verbatim.
- If the output ends before `</think>`, all of it after the opening is reasoning (e.g. the
  request ran into `max_tokens` while thinking).

Streaming: tags arrive split across deltas at any character (`"<thi"`, `"nk>"`), so the splitter
holds back the shortest text that may still turn into a tag, and nothing more: a suffix that is
a proper prefix of the awaited tag, plus, before the first non-whitespace character, the leading
whitespace (it is dropped if a `<think>` follows). `flush()` releases what is held at the end.
"""

from __future__ import annotations

from enum import Enum

from moecluster.router.requests.held_text import partial_marker_len


class _State(Enum):
    OPENING = "opening"  # nothing but whitespace so far: a `<think>` may still open reasoning
    REASONING = "reasoning"  # inside the reasoning, waiting for the end tag
    AFTER_END = "after_end"  # just past the end tag: dropping whitespace before the content
    CONTENT = "content"  # everything from here on is content


class ReasoningSplitter:
    """One per generated sequence: `feed` each text delta, `flush` at the end.

    Each call returns `(reasoning_delta, content_delta)`; concatenated over the stream they equal
    `split_reasoning(full_text)` (with `""` for its `None`).
    """

    def __init__(self, start: str = "<think>", end: str = "</think>", starts_in_reasoning: bool = False) -> None:
        if not start or not end:
            raise ValueError("the reasoning tags must be non-empty")
        self._start, self._end = start, end
        self._starts_in_reasoning = starts_in_reasoning
        self._state = _State.OPENING
        self._held = ""  # text received but not yet released (see the module docstring)

    def feed(self, delta: str) -> tuple[str, str]:
        """Take the next piece of generated text; return the (reasoning, content) it releases."""
        return self._advance(delta, final=False)

    def flush(self) -> tuple[str, str]:
        """At the end of the output: release what was held back (a partial tag is plain text)."""
        return self._advance("", final=True)

    def _advance(self, delta: str, final: bool) -> tuple[str, str]:
        buf = self._held + delta
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self._state is _State.OPENING:
                lead = buf.lstrip()
                if lead.startswith(self._start):
                    buf, self._state = lead[len(self._start) :], _State.REASONING
                elif not final and self._start.startswith(lead):  # only whitespace, or a partial `<think>`
                    break
                else:  # no opening tag: the held whitespace belongs to whatever the output starts with
                    self._state = _State.REASONING if self._starts_in_reasoning else _State.CONTENT
            elif self._state is _State.REASONING:
                i = buf.find(self._end)
                if i < 0:
                    keep = 0 if final else partial_marker_len(buf, self._end)
                    reasoning.append(buf[: len(buf) - keep])
                    buf = buf[len(buf) - keep :]
                    break
                reasoning.append(buf[:i])
                buf, self._state = buf[i + len(self._end) :], _State.AFTER_END
            elif self._state is _State.AFTER_END:
                buf = buf.lstrip()
                if not buf:
                    break
                self._state = _State.CONTENT
            else:
                content.append(buf)
                buf = ""
                break
        self._held = buf
        return "".join(reasoning), "".join(content)


def split_reasoning(
    text: str, starts_in_reasoning: bool = False, *, start: str = "<think>", end: str = "</think>"
) -> tuple[str | None, str]:
    """The whole output at once: `(reasoning, content)`, reasoning `None` when it is empty.

    Defined as one `feed` plus `flush` of a `ReasoningSplitter`, so it always agrees with the
    streaming form.
    """
    splitter = ReasoningSplitter(start, end, starts_in_reasoning)
    reasoning, content = splitter.feed(text)
    rest_reasoning, rest_content = splitter.flush()
    return (reasoning + rest_reasoning) or None, content + rest_content
