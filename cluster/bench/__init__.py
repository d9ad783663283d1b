"""Benchmarks behind `moecluster bench TARGET`: each prints a table and writes JSON.

The pieces every benchmark shares live here: the machine description stored with the numbers,
percentile summaries of timings, and the JSON writer.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def machine_info() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def summarize_ns(samples: Sequence[int]) -> dict[str, float]:
    """p50 / p99 / mean / max of durations in nanoseconds, in milliseconds."""
    if not samples:
        raise ValueError("no samples to summarize")
    ms = np.asarray(samples, dtype=np.float64) / 1e6
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "max": float(ms.max()),
    }


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
