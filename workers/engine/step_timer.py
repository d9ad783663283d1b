"""Where an engine's steps spend their time: the last few hundred steps per phase.

Phases of one step (ms): `schedule`; `sync` (an expert-parallel group agreeing on the step);
`launch` (building the batch and issuing the forward and sampling: host work, the GPU runs
behind it); `gpu_wait` (waiting for the sampled tokens: how far the GPU was behind); `outputs`
(tokens appended, stop checks, detokenization, deltas); `step` (the whole iteration). Only
steps that ran a forward are recorded. Read through a rank actor's `step_profile` (`bench serve`).
"""

from __future__ import annotations

from collections import deque

WINDOW = 256


class StepTimer:
    def __init__(self, window: int = WINDOW) -> None:
        self._phases: dict[str, deque[float]] = {}
        self.window = window

    def record(self, phase: str, seconds: float) -> None:
        self._phases.setdefault(phase, deque(maxlen=self.window)).append(seconds)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per phase over the window: p50 and mean in ms and the count."""
        out = {}
        for phase, values in list(self._phases.items()):
            v = sorted(values)
            if v:  # a snapshot from another thread can see a phase's deque before its first value
                out[phase] = {"p50_ms": v[len(v) // 2] * 1e3, "mean_ms": sum(v) / len(v) * 1e3, "n": len(v)}
        return out

    def clear(self) -> None:
        self._phases.clear()
