from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moecluster.workers.checkpoint.tiny import TinySpec, make_tiny

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The toy models' matrices are tiny: one thread beats two (no OpenMP hand-offs), and it keeps the
# suite from stalling when the machine is shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """make-tiny checkpoints, written once per session per spec."""
    cache: dict[TinySpec, Path] = {}

    def get(**knobs: object) -> Path:
        spec = TinySpec(**knobs)  # type: ignore[arg-type]
        if spec not in cache:
            name = "-".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "default"
            cache[spec] = make_tiny(tmp_path_factory.mktemp(name), spec)
        return cache[spec]

    return get
