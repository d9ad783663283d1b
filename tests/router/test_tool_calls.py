"""Tool calls from Kimi K2's and DeepSeek-V3's marker formats: one-shot, streamed, and malformed."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moecluster.router.requests.tool_calls import (
    DEEPSEEK_V3_MARKERS,
    DEEPSEEK_V3_SEP,
    KIMI_K2_ARGUMENT_BEGIN,
    KIMI_K2_MARKERS,
    DeepSeekV3ToolParser,
    KimiK2ToolParser,
    StreamEvent,
    ToolCall,
    ToolCallParser,
    tool_parser_for,
)

K_SB, K_SE, K_CB, K_CE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>", "<|tool_call_end|>"
K_ARG = "<|tool_call_argument_begin|>"
D_SB, D_SE, D_CB, D_CE = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
D_SEP = "<｜tool▁sep｜>"

NESTED = '{"filter": {"tags": ["a", "b"], "range": {"lo": 1, "hi": [2, 3.5]}}, "ok": true, "none": null}'
UNICODE = '{"city": "北京", "note": "naïve 😀 \\u00e9"}'
BRACES = '{"code": "fn() { return \\"}\\"; } // {", "re": "[{}]+"}'


def kimi_call(name: str, index: int, arguments: str) -> str:
    return f"{K_CB}functions.{name}:{index}{K_ARG}{arguments}{K_CE}"


def deepseek_call(name: str, arguments: str) -> str:
    return f"{D_CB}function{D_SEP}{name}\n```json\n{arguments}\n```{D_CE}"


def deepseek31_call(name: str, arguments: str) -> str:
    return f"{D_CB}{name}{D_SEP}{arguments}{D_CE}"


def counter_ids() -> DeepSeekV3ToolParser:
    return DeepSeekV3ToolParser(make_id=lambda i: f"call_{i}")


def test_markers_are_the_documented_tokens() -> None:
    assert (KIMI_K2_MARKERS.section_begin, KIMI_K2_MARKERS.section_end) == (K_SB, K_SE)
    assert (KIMI_K2_MARKERS.call_begin, KIMI_K2_MARKERS.call_end, KIMI_K2_ARGUMENT_BEGIN) == (K_CB, K_CE, K_ARG)
    assert (DEEPSEEK_V3_MARKERS.section_begin, DEEPSEEK_V3_MARKERS.section_end) == (D_SB, D_SE)
    assert (DEEPSEEK_V3_MARKERS.call_begin, DEEPSEEK_V3_MARKERS.call_end, DEEPSEEK_V3_SEP) == (D_CB, D_CE, D_SEP)
    assert "\uff5c" in D_SB and "\u2581" in D_SB  # fullwidth vertical bar, lower one eighth block


# --- Kimi K2 ---------------------------------------------------------------------------------


def test_kimi_one_call() -> None:
    text = K_SB + kimi_call("get_weather", 0, '{"city": "Beijing"}') + K_SE
    content, calls = KimiK2ToolParser().parse(text)
    assert content == ""
    assert calls == [ToolCall("functions.get_weather:0", "get_weather", '{"city": "Beijing"}')]
    assert calls[0].to_openai() == {
        "id": "functions.get_weather:0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'},
    }


def test_kimi_several_calls_with_content_and_whitespace() -> None:
    text = (
        f"Let me check both.\n\n{K_SB}\n  {K_CB} functions.get_weather:0 \n{K_ARG}\n"
        f'{{"city": "Beijing"}}\n{K_CE}\n{kimi_call("search", 1, NESTED)}\n {K_SE}'
    )
    content, calls = KimiK2ToolParser().parse(text)
    assert content == "Let me check both.\n\n"
    assert [(c.id, c.name) for c in calls] == [("functions.get_weather:0", "get_weather"), ("functions.search:1", "search")]
    assert calls[0].arguments == '{"city": "Beijing"}'  # trimmed
    assert json.loads(calls[1].arguments) == json.loads(NESTED)


@pytest.mark.parametrize(
    ("call_id", "name"),
    [("functions.mcp.files.read:12", "mcp.files.read"), ("get_time:3", "get_time"), ("functions.ping", "ping")],
)
def test_kimi_names_from_ids(call_id: str, name: str) -> None:
    _, calls = KimiK2ToolParser().parse(f"{K_SB}{K_CB}{call_id}{K_ARG}{{}}{K_CE}{K_SE}")
    assert calls == [ToolCall(call_id, name, "{}")]


@pytest.mark.parametrize("arguments", [NESTED, UNICODE, BRACES, "{}", '{"x": "<|tool_call_end"}'])
def test_kimi_arguments_are_kept_verbatim(arguments: str) -> None:
    _, calls = KimiK2ToolParser().parse(f"{K_SB}{kimi_call('f', 0, arguments)}{K_SE}")
    assert [c.arguments for c in calls] == [arguments]


def test_content_after_the_section() -> None:
    text = f"a{K_SB}{kimi_call('f', 0, '{}')}{K_SE} b"
    assert KimiK2ToolParser().parse(text) == ("a b", [ToolCall("functions.f:0", "f", "{}")])


# --- DeepSeek-V3 / R1 / V3.1 -----------------------------------------------------------------


def test_deepseek_one_call() -> None:
    text = D_SB + deepseek_call("get_weather", '{"location": "Tokyo"}') + D_SE
    content, calls = counter_ids().parse(text)
    assert (content, calls) == ("", [ToolCall("call_0", "get_weather", '{"location": "Tokyo"}')])


def test_deepseek_several_calls_separated_by_newlines() -> None:
    text = (
        f"I'll look these up.{D_SB}{deepseek_call('get_weather', UNICODE)}\n{deepseek_call('search', NESTED)}\n"
        f"{deepseek_call('run', BRACES)}{D_SE}"
    )
    content, calls = counter_ids().parse(text)
    assert content == "I'll look these up."
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("call_0", "get_weather", UNICODE), ("call_1", "search", NESTED), ("call_2", "run", BRACES)]


def test_deepseek_v31_form_and_mixed() -> None:
    text = f"{D_SB}{deepseek31_call('get_weather', UNICODE)}{deepseek_call('f', '{}')}{D_SE}"
    content, calls = counter_ids().parse(text)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", UNICODE), ("f", "{}")]


def test_deepseek_fence_variants() -> None:
    code = '{"code": "```py\\nprint(1)\\n```"}'  # a fence inside a JSON string
    bodies = [
        f"function{D_SEP}f\n```json\n{code}\n```",
        f"function{D_SEP} f ```{code}```",
        f"function{D_SEP}f\n```json{{}}```\n",
    ]
    for body in bodies:
        _, calls = counter_ids().parse(f"{D_SB}{D_CB}{body}{D_CE}{D_SE}")
        assert len(calls) == 1 and calls[0].name == "f", body
    assert counter_ids().parse(f"{D_SB}{D_CB}{bodies[0]}{D_CE}{D_SE}")[1][0].arguments == code


def test_deepseek_default_ids_are_random() -> None:
    text = f"{D_SB}{deepseek31_call('f', '{}')}{deepseek31_call('g', '{}')}{D_SE}"
    ids = [c.id for c in DeepSeekV3ToolParser().parse(text)[1] + DeepSeekV3ToolParser().parse(text)[1]]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids) and len(set(ids)) == 4


# --- malformed and incomplete ----------------------------------------------------------------


KIMI_BROKEN = [
    f"{K_SB}{K_CB}functions.f:0{K_ARG}{{\"a\": 1{K_CE}{K_SE}",  # bad JSON
    f"{K_SB}{K_CB}functions.f:0{K_ARG}[1, 2]{K_CE}{K_SE}",  # not an object
    f"{K_SB}{K_CB}functions.f:0 {{}}{K_CE}{K_SE}",  # no argument marker
    f"{K_SB}{K_CB}{K_ARG}{{}}{K_CE}{K_SE}",  # no name
    f"{K_SB}{K_CB}functions.my tool:0{K_ARG}{{}}{K_CE}{K_SE}",  # space in the name
    f"{K_SB}{K_CB}functions.f:0{K_ARG}{{\"a\": ",  # cut off inside the call
    f"{K_SB}{K_CB}functions.f:0{K_ARG}{{}}",  # cut off before the end marker
    f"{K_SB}\n{K_CB}functions.f",
    f"{K_SB}",
    f"{K_SB}\n{K_SE}",  # an empty section
    f"{K_SB} <|tool_c",  # cut off inside a marker
    f"{K_SB}oops{K_CB}functions.f:0{K_ARG}{{}}{K_CE}{K_SE}",  # text where a marker should be
    f"Hi{K_SB}{K_CB}functions.f:0{K_ARG}{{}}{K_CB}functions.g:1{K_ARG}{{}}{K_CE}{K_SE}",  # a missing call end
    "<|tool_calls_section_be",
    f"{K_CB}functions.f:0{K_ARG}{{}}{K_CE}",  # a call outside any section is text
]


@pytest.mark.parametrize("text", KIMI_BROKEN)
def test_without_a_parsed_call_the_text_comes_back_verbatim(text: str) -> None:
    assert KimiK2ToolParser().parse(text) == (text, [])


def test_broken_call_next_to_good_ones_stays_as_text() -> None:
    bad = f"{K_CB}functions.f:0{K_ARG}{{oops}}{K_CE}"
    good = kimi_call("g", 1, "{}")
    # the framing of a section with a parsed call is dropped; the broken call's raw text stays
    assert KimiK2ToolParser().parse(f"a{K_SB}{bad}\n{good}{K_SE}b") == (f"a{bad}b", [ToolCall("functions.g:1", "g", "{}")])
    assert KimiK2ToolParser().parse(f"a{K_SB}{good}\n{bad}{K_SE}b") == (f"a{bad}b", [ToolCall("functions.g:1", "g", "{}")])


def test_truncated_after_good_calls() -> None:
    good = kimi_call("g", 0, "{}")
    # no section end (the output stopped after the last call): the calls stand, the whitespace goes
    assert KimiK2ToolParser().parse(f"{K_SB}{good}\n") == ("", [ToolCall("functions.g:0", "g", "{}")])
    # cut off in the second call: its raw text is content
    cut = f"{K_CB}functions.h:1{K_ARG}{{\"q\": \"ab"
    assert KimiK2ToolParser().parse(f"{K_SB}{good}{cut}") == (cut, [ToolCall("functions.g:0", "g", "{}")])
    # text where a marker should be ends the section; it and what follows are content
    assert KimiK2ToolParser().parse(f"{K_SB}{good} and more{K_SE}") == (f"and more{K_SE}", [ToolCall("functions.g:0", "g", "{}")])


@pytest.mark.parametrize(
    "text",
    [
        f"{D_SB}{D_CB}function{D_SEP}f\n```json\n{{\"a\": }}\n```{D_CE}{D_SE}",  # bad JSON
        f"{D_SB}{D_CB}function{D_SEP}f\n{{\"a\": 1}}{D_CE}{D_SE}",  # V3 form without the fence
        f"{D_SB}{D_CB}f{{\"a\": 1}}{D_CE}{D_SE}",  # no separator
        f"{D_SB}{D_CB}{D_SEP}{{}}{D_CE}{D_SE}",  # no name
        f"{D_SB}{D_CB}function{D_SEP}f\n```json\n{{\"a\": 1}}",  # cut off
        f"Thinking done.\n{D_SB}",
    ],
)
def test_deepseek_broken(text: str) -> None:
    assert counter_ids().parse(text) == (text, [])


# --- streaming -------------------------------------------------------------------------------


def run_stream(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[ToolCall], list[StreamEvent]]:
    s = parser.stream()
    events = [s.feed(p) for p in pieces] + [s.finish()]
    return "".join(e.content for e in events), [c for e in events for c in e.calls], events


def test_stream_releases_content_early_and_calls_when_complete() -> None:
    s = KimiK2ToolParser().stream()
    assert s.feed("Hello <|tool").content == "Hello "  # only a possible section marker waits
    assert s.feed("box|> ").content == "<|toolbox|> "
    assert s.feed(K_SB[:10]).content == ""
    assert s.feed(K_SB[10:] + "\n" + K_CB + "functions.f:0" + K_ARG + '{"a":').content == ""
    event = s.feed(f' 1}}{K_CE}\n{K_CB}functions.g:1{K_ARG}{{}}{K_CE}')
    assert event.calls == (ToolCall("functions.f:0", "f", '{"a": 1}'), ToolCall("functions.g:1", "g", "{}"))
    assert event.tool_call_deltas() == [
        {"index": 0, "id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"index": 1, "id": "functions.g:1", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    event = s.feed(f"{K_CB}functions.h:2{K_ARG}{{}}{K_CE}{K_SE}")
    assert event.first_index == 2 and event.tool_call_deltas()[0]["index"] == 2
    assert s.finish() == StreamEvent(first_index=3)


def test_stream_of_a_section_without_calls_releases_it_at_the_end() -> None:
    text = f"a{K_SB}{K_CB}functions.f:0{K_ARG}{{"
    content, calls, events = run_stream(KimiK2ToolParser(), list(text))
    assert (content, calls) == (text, [])
    assert events[-1].content == text[1:]  # held until the output ended


@pytest.mark.parametrize("parser", [KimiK2ToolParser(), counter_ids()], ids=["kimi_k2", "deepseek_v3"])
def test_stream_split_at_every_position(parser: ToolCallParser) -> None:
    if isinstance(parser, KimiK2ToolParser):
        text = f"Hi {K_SB}{kimi_call('f', 0, BRACES)}\n{kimi_call('g', 1, '{}')}{K_SE}!"
    else:
        text = f"Hi {D_SB}{deepseek_call('f', BRACES)}\n{deepseek31_call('g', '{}')}{D_SE}!"
    expected = parser.parse(text)
    assert expected[0] == "Hi !" and [c.name for c in expected[1]] == ["f", "g"]
    assert run_stream(parser, list(text))[:2] == expected
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 7):
            assert run_stream(parser, [text[:i], text[i:j], text[j:]])[:2] == expected


def test_tool_parser_for_model_type() -> None:
    assert isinstance(tool_parser_for("kimi_k2"), KimiK2ToolParser)
    assert isinstance(tool_parser_for("deepseek_v3"), DeepSeekV3ToolParser)
    with pytest.raises(ValueError, match="llama"):
        tool_parser_for("llama")


# --- properties ------------------------------------------------------------------------------

ARGUMENTS = st.sampled_from([NESTED, UNICODE, BRACES, "{}", '{"a": [1, {"b": "}"}]}', '{"s": "```"}'])
NAMES = st.sampled_from(["get_weather", "search", "mcp.files.read", "f"])
SPACE = st.sampled_from(["", "", "\n", " ", "\n\n"])
WORDS = st.sampled_from(["Hello", " ", "\n", "<", "|", "｜", "答案", "😀", "{", "}", "```"])


def pieces_for(fmt: str) -> st.SearchStrategy[str]:
    """Fragments of the format: whole markers, their prefixes and suffixes, call bodies, whole calls
    (so that sections with good and broken calls are common), JSON and other text."""
    if fmt == "kimi_k2":
        markers = [K_SB, K_SE, K_CB, K_CE, K_ARG]
        bodies = ["functions.f:0", "functions.get_weather:1", " g:2 "]
        calls = st.builds(kimi_call, NAMES, st.integers(0, 3), ARGUMENTS)
    else:
        markers = [D_SB, D_SE, D_CB, D_CE, D_SEP]
        bodies = ["function", "get_weather\n```json\n", "\n```", "f"]
        calls = st.one_of(st.builds(deepseek_call, NAMES, ARGUMENTS), st.builds(deepseek31_call, NAMES, ARGUMENTS))
    parts = markers + [m[:k] for m in markers for k in (2, 9)] + [m[9:] for m in markers] + bodies
    section_begin = st.just(markers[0])
    return st.one_of(st.sampled_from(parts), section_begin, calls, ARGUMENTS, WORDS, st.text(max_size=3))


def render(fmt: str, calls: list[tuple[str, str]], spaces: list[str]) -> str:
    if fmt == "kimi_k2":
        body = "".join(s + kimi_call(n, i, a) for i, ((n, a), s) in enumerate(zip(calls, spaces)))
        return K_SB + body + K_SE
    body = "".join(s + (deepseek_call if i % 2 else deepseek31_call)(n, a) for i, ((n, a), s) in enumerate(zip(calls, spaces)))
    return D_SB + body + D_SE


def make_parser(fmt: str) -> ToolCallParser:
    return KimiK2ToolParser() if fmt == "kimi_k2" else counter_ids()


def chunk(text: str, cuts: list[int]) -> list[str]:
    points = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(points, points[1:])]


FORMATS = st.sampled_from(["kimi_k2", "deepseek_v3"])


@settings(max_examples=400)  # about one text in eight has a parsed call
@given(FORMATS, st.data())
def test_streaming_equals_one_shot(fmt: str, data: st.DataObject) -> None:
    text = "".join(data.draw(st.lists(pieces_for(fmt), max_size=16)))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    parser = make_parser(fmt)
    content, calls = parser.parse(text)
    assert run_stream(parser, chunk(text, cuts))[:2] == (content, calls)
    if not calls:
        assert content == text  # nothing is lost


@given(FORMATS, st.data())
def test_well_formed_sections_round_trip(fmt: str, data: st.DataObject) -> None:
    calls = data.draw(st.lists(st.tuples(NAMES, ARGUMENTS), min_size=1, max_size=4))
    spaces = data.draw(st.lists(SPACE, min_size=len(calls), max_size=len(calls)))
    before = data.draw(st.lists(WORDS, max_size=4).map("".join))
    text = before + render(fmt, calls, spaces)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    parser = make_parser(fmt)
    content, parsed = parser.parse(text)
    assert content == before
    assert [(c.name, c.arguments) for c in parsed] == calls
    assert run_stream(parser, chunk(text, cuts))[:2] == (content, parsed)
