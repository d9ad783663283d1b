"""Where an engine's steps spend their time: the last few hundred steps per phase.

Phases of one step (ms): `schedule`; `sync` (an expert-parallel group agreeing on the step);
`launch` (building the batch and issuing the forward and sampling: host work, the GPU runs
behind it); `gpu_wait` (waiting for the sampled tokens: how far the GPU was behind); `outputs`
(tokens appended, stop checks, detokenization, deltas); `step` (the whole iteration). Only
steps that ran a forward are recorded. Read through a rank actor's `step_profile` (`bench serve`).

Beside the phases, `decode_only()` totals the steps that only decoded (every scheduled sequence
computed one token) since the last `clear`: how many, the rows they sampled, their seconds, and
why those that did not replay a captured decode graph ran eagerly (the rest replayed one). Rows
over seconds is the rank's decode rate at the batch it really ran, where a median step over the
last few hundred steps would assume every stream was in each of them.
"""

from __future__ import annotations

from collections import deque
from typing import Any

WINDOW = 256


class StepTimer:
    def __init__(self, window: int = WINDOW) -> None:
        self._phases: dict[str, deque[float]] = {}
        self.window = window
        self._decode = [0, 0, 0.0]  # decode-only steps, rows sampled in them, their seconds
        self._eager: dict[str, int] = {}  # those of them run eagerly, by reason (the others replayed a graph)

    def record_decode(self, rows: int, seconds: float, eager_reason: str | None = None) -> None:
        """One step that only decoded: `rows` tokens sampled in `seconds` (its whole iteration);
        `eager_reason`: why it ran eagerly (None: it replayed a captured decode graph)."""
        d = self._decode
        d[0], d[1], d[2] = d[0] + 1, d[1] + rows, d[2] + seconds
        if eager_reason is not None:
            self._eager[eager_reason] = self._eager.get(eager_reason, 0) + 1

    def record(self, phase: str, seconds: float) -> None:
        self._phases.setdefault(phase, deque(maxlen=self.window)).append(seconds)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per phase over the window: p50 and mean in ms and the count."""
        out: dict[str, dict[str, float]] = {}
        for phase, values in list(self._phases.items()):
            v = sorted(values)
            if v:  # a snapshot from another thread can see a phase's deque before its first value
                out[phase] = {"p50_ms": v[len(v) // 2] * 1e3, "mean_ms": sum(v) / len(v) * 1e3, "n": len(v)}
        return out

    def decode_only(self) -> dict[str, Any] | None:
        """The decode-only steps since the last clear: their count, rows, seconds, graph replays and
        the eager ones by reason (None: none ran)."""
        steps, rows, seconds = self._decode
        if not steps:
            return None
        replayed = steps - sum(self._eager.values())
        return {"steps": steps, "rows": rows, "seconds": seconds, "replayed": replayed, "eager": dict(self._eager)}

    def clear(self) -> None:
        self._phases.clear()
        self._decode = [0, 0, 0.0]
        self._eager = {}
