"""Request traces for the autoscaling simulator: the file format, a loader, a writer and a generator.

A trace is one request per line, in arrival order or not (the loader sorts by arrival):

    JSONL (.jsonl, .json):  {"arrival_s": 0.42, "prompt_tokens": 1800, "output_tokens": 350}
    CSV (.csv):             a header naming arrival_s,prompt_tokens,output_tokens, then one row per request

`arrival_s` is seconds from the start of the trace (>= 0), `prompt_tokens` >= 1, `output_tokens` >= 1
(the first output token comes from the prefill). Other fields and columns are ignored, so a production
request log exported with these three columns loads as is. Errors name the file, the line and the field.

`make_bursty_trace` draws a synthetic one: Poisson arrivals at `base_rps`, raised to `burst_rps` for
`burst_len_s` every `burst_every_s` (the first burst starts at `burst_every_s`, so a trace opens at the
base load), optionally ramping over `ramp_s`, with lengths from two `LengthDist`s. Same arguments
and seed, same trace.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("arrival_s", "prompt_tokens", "output_tokens")


class TraceError(ValueError):
    """An unreadable trace; the message names the file, the line and the field."""


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class LengthDist:
    """Token counts drawn from a log-normal with this median and shape, clipped to [low, high].

    Log-normal because request lengths in production logs are right-skewed: most short, a long tail.
    `sigma` = 0 gives the median every time.
    """

    median: int
    sigma: float = 0.8
    low: int = 1
    high: int = 32768

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.median <= self.high:
            raise ValueError(f"LengthDist: need 1 <= low <= median <= high, got {self.low}, {self.median}, {self.high}")
        if self.sigma < 0:
            raise ValueError(f"LengthDist: sigma must be >= 0, got {self.sigma}")

    def sample(self, rng: random.Random) -> int:
        value = round(self.median * math.exp(rng.gauss(0.0, self.sigma))) if self.sigma else self.median
        return min(self.high, max(self.low, value))


def make_bursty_trace(
    duration_s: float,
    base_rps: float,
    burst_rps: float,
    burst_every_s: float,
    burst_len_s: float,
    prompt: LengthDist = LengthDist(1024, 0.8, 16, 16384),
    output: LengthDist = LengthDist(256, 0.8, 1, 4096),
    seed: int = 0,
    ramp_s: float = 0.0,
) -> list[TraceRequest]:
    """Poisson arrivals at `base_rps`, with bursts at `burst_rps` starting at k x `burst_every_s`
    (k >= 1). A burst holds its rate for `burst_len_s`; with `ramp_s` > 0 it ramps linearly up from
    the base rate over `ramp_s` before that and back down over `ramp_s` after (real surges build
    over minutes; 0 gives a square wave). Arrivals come by thinning: candidates at the segment's top
    rate, each kept with probability rate(t) / top (exact for a non-homogeneous Poisson process)."""
    numbers = {"duration_s": duration_s, "base_rps": base_rps, "burst_rps": burst_rps,
               "burst_every_s": burst_every_s, "burst_len_s": burst_len_s, "ramp_s": ramp_s}
    if bad := [f"{k}={v}" for k, v in numbers.items() if not math.isfinite(v)]:
        raise ValueError(f"make_bursty_trace: every length and rate must be a finite number, got {', '.join(bad)}")
    if duration_s <= 0 or base_rps < 0 or burst_rps < 0 or ramp_s < 0:
        raise ValueError("make_bursty_trace: duration_s must be > 0, the rates and ramp_s >= 0")
    if not 0 < burst_len_s + 2 * ramp_s < burst_every_s:
        raise ValueError(f"make_bursty_trace: need 0 < burst_len_s + 2 ramp_s < burst_every_s, "
                         f"got {burst_len_s} + 2 x {ramp_s} and {burst_every_s}")
    rng = random.Random(seed)
    requests = []
    for start, end, r0, r1 in _segments(duration_s, base_rps, burst_rps, burst_every_s, burst_len_s, ramp_s):
        top, t = max(r0, r1), start
        while top > 0:
            t += rng.expovariate(top)
            if t >= end:
                break
            if r0 != r1 and rng.random() * top > r0 + (r1 - r0) * (t - start) / (end - start):
                continue
            requests.append(TraceRequest(round(t, 6), prompt.sample(rng), output.sample(rng)))
    return requests


def _segments(duration: float, base: float, burst: float, every: float, length: float,
              ramp: float) -> Iterator[tuple[float, float, float, float]]:
    """(start, end, rate at start, rate at end) pieces of the rate, linear in between, up to `duration`."""
    pieces: list[tuple[float, float, float, float]] = []
    t, k = 0.0, 1
    while t < duration:
        b = k * every
        pieces += [(t, b, base, base), (b, b + ramp, base, burst), (b + ramp, b + ramp + length, burst, burst),
                   (b + ramp + length, b + 2 * ramp + length, burst, base)]
        t, k = b + 2 * ramp + length, k + 1
    for start, end, r0, r1 in pieces:
        if end > start and start < duration:
            stop = min(end, duration)
            yield start, stop, r0, r0 + (r1 - r0) * (stop - start) / (end - start)


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> Path:
    """Write JSONL or CSV, chosen by the suffix as `load_trace` reads it."""
    p = Path(path)
    rows = [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests]
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if _is_csv(p):
            with p.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(FIELDS)
                writer.writerows(rows)
        else:
            p.write_text("".join(json.dumps(dict(zip(FIELDS, row))) + "\n" for row in rows))
    except OSError as e:
        raise TraceError(f"cannot write trace {p}: {e.strerror or e}") from None
    return p


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSONL or CSV trace (by suffix: .csv is CSV, anything else JSONL), sorted by arrival."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"trace file {p} does not exist") from None
    except UnicodeDecodeError as e:
        raise TraceError(f"trace {p}: not UTF-8 text (byte {e.start}); expected JSONL or CSV") from None
    except OSError as e:  # a directory, no permission, ...
        raise TraceError(f"trace {p}: cannot read it: {e.strerror or e}") from None
    rows = _csv_rows(p, text) if _is_csv(p) else _jsonl_rows(p, text)
    requests = [_request(p, line, row) for line, row in rows]
    if not requests:
        raise TraceError(f"trace {p} has no requests")
    return sorted(requests, key=lambda r: r.arrival_s)


def _is_csv(p: Path) -> bool:
    return p.suffix.lower() == ".csv"


def _jsonl_rows(p: Path, text: str) -> Iterator[tuple[int, dict]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TraceError(f"trace {p} line {line}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TraceError(f"trace {p} line {line}: expected a JSON object with {', '.join(FIELDS)}")
        yield line, row


def _csv_rows(p: Path, text: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(text.splitlines())
    missing = [f for f in FIELDS if f not in (reader.fieldnames or ())]
    if missing:
        raise TraceError(f"trace {p} line 1: the CSV header lacks {', '.join(missing)}")
    for row in reader:
        yield reader.line_num, row


def _request(p: Path, line: int, row: dict) -> TraceRequest:
    return TraceRequest(_field(p, line, row, "arrival_s", integer=False),
                        int(_field(p, line, row, "prompt_tokens", integer=True)),
                        int(_field(p, line, row, "output_tokens", integer=True)))


def _field(p: Path, line: int, row: dict, name: str, integer: bool) -> float:
    where = f"trace {p} line {line}: field '{name}'"
    raw = row.get(name)
    if raw is None or raw == "":
        raise TraceError(f"{where}: missing")
    try:
        value = math.nan if isinstance(raw, bool) else float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or (integer and value != int(value)):
        raise TraceError(f"{where}: expected {'an integer' if integer else 'a number'}, got {raw!r}")
    minimum = 1 if integer else 0
    if value < minimum:
        raise TraceError(f"{where}: must be >= {minimum}, got {raw!r}")
    return value


def trace_stats(requests: Sequence[TraceRequest], bin_s: float = 10.0) -> dict[str, float]:
    """Size and shape of a trace: request count, span, mean and peak requests/s (over `bin_s` bins)."""
    span = requests[-1].arrival_s if requests else 0.0
    bins: dict[int, int] = {}
    for r in requests:
        bins[int(r.arrival_s // bin_s)] = bins.get(int(r.arrival_s // bin_s), 0) + 1
    return {
        "requests": len(requests),
        "span_s": span,
        "mean_rps": len(requests) / span if span else 0.0,
        "peak_rps": max(bins.values(), default=0) / bin_s,
        "prompt_tokens_mean": sum(r.prompt_tokens for r in requests) / max(1, len(requests)),
        "output_tokens_mean": sum(r.output_tokens for r in requests) / max(1, len(requests)),
    }
