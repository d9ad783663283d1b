"""Splitting `<think>...</think>` reasoning from content, in one piece and streamed in any chunks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moecluster.router.requests.reasoning import ReasoningSplitter, split_reasoning


def stream(pieces: list[str], starts_in_reasoning: bool = False, **tags: str) -> tuple[str, str]:
    """Feed `pieces` one by one; the concatenated (reasoning, content) including the flush."""
    splitter = ReasoningSplitter(starts_in_reasoning=starts_in_reasoning, **tags)
    outputs = [splitter.feed(p) for p in pieces] + [splitter.flush()]
    return "".join(r for r, _ in outputs), "".join(c for _, c in outputs)


def reference(text: str, starts_in_reasoning: bool = False) -> tuple[str | None, str]:
    """The rules of the module docstring, written independently of the splitter (whole text at once)."""
    lead = text.lstrip()
    if lead.startswith("<think>"):
        body = lead[len("<think>") :]
    elif starts_in_reasoning:
        body = text
    else:
        return None, text
    reasoning, _, content = body.partition("</think>")
    return reasoning or None, content.lstrip()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Just an answer.", (None, "Just an answer.")),
        ("", (None, "")),
        ("<think>Let me see.</think>42", ("Let me see.", "42")),
        ("<think>\nstep 1\nstep 2\n</think>\n\nThe answer is 42.\n", ("\nstep 1\nstep 2\n", "The answer is 42.\n")),
        ("\n  <think>r</think>c", ("r", "c")),  # whitespace before the opening tag is dropped
        ("<think></think>\n\nc", (None, "c")),  # an empty reasoning block: no reasoning
        ("<think>r</think>", ("r", "")),
        ("<think>r</think>  \n ", ("r", "")),
        ("Answer first <think>not reasoning</think> end", (None, "Answer first <think>not reasoning</think> end")),
        ("  plain", (None, "  plain")),  # leading whitespace of plain content is kept
        ("<think>a <think> b</think>c</think>d", ("a <think> b", "c</think>d")),
        ("<think>r</think>c\n\nmore", ("r", "c\n\nmore")),
        ("<think>cut off while think", ("cut off while think", "")),
        ("<think>partial end </thi", ("partial end </thi", "")),
        ("<thi", (None, "<thi")),
        ("<thinking>x", (None, "<thinking>x")),
        ("   ", (None, "   ")),
        ("<think>", (None, "")),
    ],
)
def test_split(text: str, expected: tuple[str | None, str]) -> None:
    assert split_reasoning(text) == expected
    assert reference(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Let me see.</think>\n\n42", ("Let me see.", "42")),
        ("\nLet me see.\n</think>42", ("\nLet me see.\n", "42")),  # reasoning is verbatim
        ("<think>\nopened again</think>42", ("\nopened again", "42")),  # a repeated opening tag is swallowed
        (" \n<think>r</think>c", ("r", "c")),
        ("never closed", ("never closed", "")),
        ("</think>straight to the answer", (None, "straight to the answer")),
        ("", (None, "")),
        ("  ", ("  ", "")),
        ("<thi", ("<thi", "")),
    ],
)
def test_starts_in_reasoning(text: str, expected: tuple[str | None, str]) -> None:
    assert split_reasoning(text, starts_in_reasoning=True) == expected
    assert reference(text, starts_in_reasoning=True) == expected


def test_custom_tags() -> None:
    assert split_reasoning("[[r]]\nc", start="[[", end="]]") == ("r", "c")
    assert stream(["[", "[r]", "]\nc"], start="[[", end="]]") == ("r", "c")
    with pytest.raises(ValueError):
        ReasoningSplitter(start="")


CASES = [
    ("<think>abc</think>\n\ndef", False),
    ("\n<think>x</think>y<think>z", False),
    ("abc</think>  def", True),
    ("<think>abc</think>def", True),
    ("pre<think>abc</think>", False),
    ("<think>a</thin</think>b", False),
]


@pytest.mark.parametrize(("text", "starts_in_reasoning"), CASES)
def test_split_at_every_position(text: str, starts_in_reasoning: bool) -> None:
    expected = split_reasoning(text, starts_in_reasoning)
    expected_stream = (expected[0] or "", expected[1])
    assert stream(list(text), starts_in_reasoning) == expected_stream  # one character at a time
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            pieces = [text[:i], text[i:j], text[j:]]
            assert stream(pieces, starts_in_reasoning) == expected_stream, pieces


def test_holds_back_only_a_possible_tag() -> None:
    s = ReasoningSplitter()
    assert s.feed("  ") == ("", "")  # could still be followed by <think>
    assert s.feed("<thi") == ("", "")
    assert s.feed("nk>abc</th") == ("abc", "")  # only the partial end tag waits
    assert s.feed("e rest") == ("</the rest", "")  # it was not the tag after all
    assert s.feed("</think>") == ("", "")
    assert s.feed("\n\n") == ("", "")  # whitespace after the end tag is dropped
    assert s.feed("Answer <") == ("", "Answer <")  # content is never held
    assert s.flush() == ("", "")

    s = ReasoningSplitter()
    assert s.feed(" <tx") == ("", " <tx")  # ruled out: released at once, whitespace included
    assert s.feed("<think>") == ("", "<think>")

    s = ReasoningSplitter()
    assert s.feed("<think>never closed </") == ("never closed ", "")
    assert s.flush() == ("</", "")


# Pieces that make tags appear whole, split, nested, repeated or malformed.
PIECES = st.sampled_from(
    ["<think>", "</think>", "<thi", "nk>", "</th", "ink>", "<", "/", ">", "think", "<think", "</think",
     " ", "\n", "\n\n", "a", "b c", "é", "😀", "答案"]
)
TEXTS = st.lists(st.one_of(PIECES, st.text(max_size=4)), max_size=12).map("".join)


def chunk(text: str, cuts: list[int]) -> list[str]:
    points = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(points, points[1:])]


@given(TEXTS, st.booleans(), st.data())
def test_streaming_equals_one_shot(text: str, starts_in_reasoning: bool, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    reasoning, content = split_reasoning(text, starts_in_reasoning)
    assert (reasoning, content) == reference(text, starts_in_reasoning)
    assert stream(chunk(text, cuts), starts_in_reasoning) == (reasoning or "", content)
