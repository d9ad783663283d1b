"""Kernel tests: Triton kernels run on a GPU when there is one, else under Triton's interpreter on
the CPU (tests/conftest.py sets TRITON_INTERPRET=1 there; fp32 / fp16 only: the interpreter
computes bf16 `tl.dot` wrongly)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
