"""Streaming parsers hold back only text that may still become a marker (`<think>`, a tool-call
section begin): the longest suffix that is a proper prefix of it."""

from __future__ import annotations


def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (may still become it)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
