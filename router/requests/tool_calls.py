"""Tool calls in OpenAI form, parsed from the marker tokens Kimi K2 and DeepSeek-V3/R1 write.

When a request carries tools the server decodes with `skip_special_tokens=False`, so the marker
tokens show up in the text. Both families write one *section* holding one or more *calls*:

Kimi K2 / K2-Thinking (`model_type: kimi_k2`):

    <|tool_calls_section_begin|>
    <|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|>
    <|tool_call_begin|>functions.search:1<|tool_call_argument_begin|>{"q": "..."}<|tool_call_end|>
    <|tool_calls_section_end|>

    The text before `<|tool_call_argument_begin|>` is the call id (`functions.NAME:INDEX`; the
    chat template renders it back with the tool's result, so it is kept as the OpenAI id); the
    name is the id without the `functions.` prefix and the `:INDEX` suffix.

DeepSeek-V3 / R1 (`model_type: deepseek_v3`; note the fullwidth `｜` U+FF5C and `▁` U+2581):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"location": "Tokyo"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

    DeepSeek-V3.1 drops the type and the code fence inside a call:
    `<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"location": "Tokyo"}<｜tool▁call▁end｜>`.
    The format has no call ids, so the parser makes them: `call_` + 24 random hex digits by
    default (unique across the turns of a conversation, like OpenAI's), or `make_id(index)`.

Whitespace may separate the markers. Arguments must be a JSON object (a function's parameters);
they are kept as the text the model wrote (trimmed), since OpenAI sends them as a string.

What is not a well-formed call stays text, so nothing the model wrote is lost:

- a call that does not parse (no separator, arguments that are not a JSON object, a name that is
  empty or has characters other than letters, digits and `_.:/-`) or that the output cuts off
  goes to the content as its raw text, markers included;
- a section's framing (its begin and end markers and the whitespace between calls) is dropped
  once one of its calls parses; a section none of whose calls parses is content verbatim;
- text inside a section that is neither whitespace nor a marker ends the section: from there on
  the output is content again.

So an output without a single parsed call comes back as its content unchanged.

Streaming (`parser.stream()`): content is released as it arrives, holding back only a suffix
that may still become the section's begin marker; a call is emitted once, complete, when its end
marker arrives (OpenAI clients accept a call in a single `delta.tool_calls` entry, see
`StreamEvent.tool_call_deltas`). The raw text of an unfinished call, and of a section none of
whose calls has parsed yet, is held until its fate is known. `parse(text)` is one `feed` and
`finish` of a stream, so both forms always agree.
"""

from __future__ import annotations

import json
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from moecluster.router.requests.held_text import partial_marker_len


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object's text, as the model wrote it (trimmed)

    def to_openai(self) -> dict[str, Any]:
        """The entry of `message.tool_calls` in a chat completion."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def to_openai_delta(self, index: int) -> dict[str, Any]:
        """The entry of a streamed `delta.tool_calls`: the whole call at once, at position `index`."""
        return {"index": index, **self.to_openai()}


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """What one `feed` (or `finish`) of a stream releases."""

    content: str = ""
    calls: tuple[ToolCall, ...] = ()  # calls completed by this piece, in order
    first_index: int = 0  # position of calls[0] among all the output's calls

    def tool_call_deltas(self) -> list[dict[str, Any]]:
        """`delta.tool_calls` for this piece (empty when no call completed)."""
        return [call.to_openai_delta(self.first_index + i) for i, call in enumerate(self.calls)]


@dataclass(frozen=True, slots=True)
class Markers:
    """The marker tokens of a format: a section holds calls, `call_begin BODY call_end` each."""

    section_begin: str
    section_end: str
    call_begin: str
    call_end: str


KIMI_K2_MARKERS = Markers(
    "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>", "<|tool_call_end|>"
)
KIMI_K2_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
DEEPSEEK_V3_MARKERS = Markers(
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
)
DEEPSEEK_V3_SEP = "<｜tool▁sep｜>"

# A function name: letters, digits and `_.:/-` (OpenAI allows `[A-Za-z0-9_-]`; MCP tools add more).
_NAME = re.compile(r"[\w.:/-]+")
# The V3/R1 text after the separator: the name, then the arguments in a ```json fence.
_DEEPSEEK_FENCED = re.compile(r"\s*(?P<name>[^\s`]+)\s*```(?:json)?(?P<arguments>.*?)```\s*", re.DOTALL)

CallBodyParser = Callable[[str, int], ToolCall | None]  # (text between the call markers, call index) -> call


class _Where(Enum):
    CONTENT = "content"  # outside any section
    SECTION = "section"  # inside a section, between calls
    CALL = "call"  # inside a call, before its end marker


class ToolCallStream:
    """Incremental parser of one output: `feed` each text delta, `finish` at the end."""

    def __init__(self, markers: Markers, parse_call: CallBodyParser) -> None:
        self._markers = markers
        self._parse_call = parse_call
        self._where = _Where.CONTENT
        self._buf = ""  # received text not yet released
        self._scan_from = 0  # in CALL: where in `_buf` the end marker may start (earlier text was searched)
        self._num_calls = 0
        # The current section's raw pieces, held while none of its calls has parsed: (text, is_framing).
        # None once one has (from then on framing is dropped and failed calls go straight to content).
        self._unresolved: list[tuple[str, bool]] | None = None

    def feed(self, delta: str) -> StreamEvent:
        return self._advance(delta, final=False)

    def finish(self) -> StreamEvent:
        """At the end of the output: whatever is held and did not become a call is content."""
        return self._advance("", final=True)

    def _advance(self, delta: str, final: bool) -> StreamEvent:
        m = self._markers
        buf = self._buf + delta
        content: list[str] = []
        calls: list[ToolCall] = []
        first_index = self._num_calls
        while True:
            if self._where is _Where.CONTENT:
                i = buf.find(m.section_begin)
                if i < 0:
                    keep = 0 if final else partial_marker_len(buf, m.section_begin)
                    content.append(buf[: len(buf) - keep])
                    buf = buf[len(buf) - keep :]
                    break
                content.append(buf[:i])
                buf = buf[i + len(m.section_begin) :]
                self._unresolved = [(m.section_begin, True)]
                self._where = _Where.SECTION
            elif self._where is _Where.SECTION:
                rest = buf.lstrip()
                space = buf[: len(buf) - len(rest)]
                if rest.startswith(m.call_begin):
                    self._hold(space, framing=True, content=content)
                    buf, self._where, self._scan_from = rest[len(m.call_begin) :], _Where.CALL, 0
                elif rest.startswith(m.section_end):
                    self._hold(space + m.section_end, framing=True, content=content)
                    self._release_section(content)
                    buf, self._where = rest[len(m.section_end) :], _Where.CONTENT
                elif not final and (m.call_begin.startswith(rest) or m.section_end.startswith(rest)):
                    break  # whitespace, perhaps followed by the start of a marker
                else:  # other text, or the end of the output: the section is over
                    self._hold(space, framing=True, content=content)
                    self._release_section(content)
                    buf, self._where = rest, _Where.CONTENT
            else:
                j = buf.find(m.call_end, self._scan_from)
                if j < 0 and not final:
                    self._scan_from = max(0, len(buf) - len(m.call_end) + 1)
                    break
                if j < 0:  # cut off inside the call
                    self._hold(m.call_begin + buf, framing=False, content=content)
                    self._release_section(content)
                    buf, self._where = "", _Where.CONTENT
                    continue
                body, buf = buf[:j], buf[j + len(m.call_end) :]
                call = self._parse_call(body, self._num_calls)
                if call is None:
                    self._hold(m.call_begin + body + m.call_end, framing=False, content=content)
                else:
                    calls.append(call)
                    self._num_calls += 1
                    if self._unresolved is not None:  # the section is real: its framing goes, failed calls stay
                        content.extend(text for text, framing in self._unresolved if not framing)
                        self._unresolved = None
                self._where = _Where.SECTION
        self._buf = buf
        return StreamEvent("".join(content), tuple(calls), first_index)

    def _hold(self, text: str, framing: bool, content: list[str]) -> None:
        """Raw section text: held while the section is unresolved, else framing is dropped, the rest released."""
        if self._unresolved is not None:
            self._unresolved.append((text, framing))
        elif not framing:
            content.append(text)

    def _release_section(self, content: list[str]) -> None:
        """The section ends: if none of its calls parsed, all of it is content, verbatim."""
        if self._unresolved is not None:
            content.extend(text for text, _ in self._unresolved)
        self._unresolved = None


class ToolCallParser(Protocol):
    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The whole output at once: (content without the parsed calls, calls)."""

    def stream(self) -> ToolCallStream:
        """A fresh incremental parser for one output."""


class _MarkerToolParser(ABC):
    """Shared by both formats: the section/call structure; subclasses read one call's body."""

    markers: Markers

    @abstractmethod
    def parse_call(self, body: str, index: int) -> ToolCall | None:
        """The call written between the call markers, or None when it is malformed."""

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.markers, self.parse_call)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        stream = self.stream()
        head, tail = stream.feed(text), stream.finish()
        return head.content + tail.content, [*head.calls, *tail.calls]


class KimiK2ToolParser(_MarkerToolParser):
    markers = KIMI_K2_MARKERS

    def parse_call(self, body: str, index: int) -> ToolCall | None:
        head, sep, arguments = body.partition(KIMI_K2_ARGUMENT_BEGIN)
        call_id = head.strip()
        stem, colon, number = call_id.rpartition(":")  # functions.get_weather:0
        name = (stem if colon and number.isdigit() else call_id).removeprefix("functions.")
        args = _json_object(arguments)
        if not sep or not _is_name(name) or args is None:
            return None
        return ToolCall(call_id, name, args)


class DeepSeekV3ToolParser(_MarkerToolParser):
    markers = DEEPSEEK_V3_MARKERS

    def __init__(self, make_id: Callable[[int], str] | None = None) -> None:
        """`make_id(index)` names the output's index-th call; by default `call_` + 24 random hex digits."""
        self._make_id = make_id or _random_call_id

    def parse_call(self, body: str, index: int) -> ToolCall | None:
        head, sep, rest = body.partition(DEEPSEEK_V3_SEP)
        fenced = _DEEPSEEK_FENCED.fullmatch(rest)
        if head.strip() == "function" and fenced:  # V3 / R1: function<sep>NAME ```json ARGS ```
            name, arguments = fenced["name"], fenced["arguments"]
        else:  # V3.1: NAME<sep>ARGS
            name, arguments = head.strip(), rest
        args = _json_object(arguments)
        if not sep or not _is_name(name) or args is None:
            return None
        return ToolCall(self._make_id(index), name, args)


TOOL_PARSERS: dict[str, Callable[[], ToolCallParser]] = {
    "kimi_k2": KimiK2ToolParser,
    "deepseek_v3": DeepSeekV3ToolParser,
}


def tool_parser_for(model_type: str) -> ToolCallParser:
    """The parser for a checkpoint's config.json `model_type` (both families share one architecture
    name, DeepseekV3ForCausalLM, so the model type is what tells the formats apart)."""
    try:
        return TOOL_PARSERS[model_type]()
    except KeyError:
        known = ", ".join(TOOL_PARSERS)
        raise ValueError(f"no tool-call format for model_type {model_type!r}; known: {known}") from None


def _json_object(text: str) -> str | None:
    """`text` trimmed if it is a JSON object, else None."""
    text = text.strip()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return text if isinstance(value, dict) else None


def _is_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def _random_call_id(index: int) -> str:
    return "call_" + secrets.token_hex(12)
