from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels run under Triton's interpreter. Set before anything imports a
# kernel module (some define their kernels at import); the model's CPU path calls the torch
# references directly, so only the kernel tests go through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moecluster.workers.checkpoint.tiny import TinySpec, make_tiny  # noqa: E402 (after the line above)

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests need CUDA (two GPUs where they say so); elsewhere they are skipped, not failed."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        need = marker.kwargs.get("count", 1)
        if gpus < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA device(s), found {gpus}"))
