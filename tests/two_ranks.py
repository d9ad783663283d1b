"""Run a function as every rank of a fresh torch.distributed job on this machine."""

from __future__ import annotations

import multiprocessing as mp
import socket
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: Callable[..., None], world: int, args: tuple, results: int, timeout: float) -> list[Any]:
    """Spawn target(rank, world, port, queue, *args) for every rank; collect `results` queue items.
    Children still alive when this returns or fails are killed."""
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, world, port, queue, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        got = [queue.get(timeout=timeout) for _ in range(results)]
        for p in procs:
            p.join(timeout)
            assert p.exitcode == 0, f"rank exited with {p.exitcode}"
        return got
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def run_two_ranks(target: Callable[[int, int, Any], None], results: int, timeout: float) -> list[Any]:
    """target(rank, port, queue) on ranks 0 and 1."""
    return run_ranks(_drop_world, 2, (target,), results, timeout)


def _drop_world(rank: int, world: int, port: int, queue: Any, target: Callable[[int, int, Any], None]) -> None:
    target(rank, port, queue)
