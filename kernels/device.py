"""Facts about a CUDA device the kernel launchers look up per launch, cached per device index
(a torch query per layer per step adds up on the decode path)."""

from __future__ import annotations

import functools

import torch


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return _capability(device_index(device))


def cuda_sm_count(device: torch.device) -> int:
    return _sm_count(device_index(device))
