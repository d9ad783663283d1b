"""Run a function as rank 0 and rank 1 of a fresh two-process torch.distributed job."""

from __future__ import annotations

import multiprocessing as mp
import socket
from collections.abc import Callable
from typing import Any


def run_two_ranks(target: Callable[[int, int, Any], None], results: int, timeout: float) -> list[Any]:
    """Spawn target(rank, port, queue) for ranks 0 and 1; collect `results` items from the queue.
    Children still alive when this returns or fails are killed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, port, queue)) for rank in range(2)]
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
