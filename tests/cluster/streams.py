"""Drive many streams through a deployment and collect each request's tokens per sample."""

from __future__ import annotations

import queue
import time
from typing import Callable

from moecluster.workers.engine.sampling_params import SamplingParams


def drive(
    dep,  # noqa: ANN001 - a Deployment
    requests: dict[str, tuple[list[int], SamplingParams]],
    during: Callable[[int], bool] | None = None,
    timeout: float = 240.0,
) -> dict[str, dict[int, list[int]]]:
    """Submit every request, then gather deltas until all finish. `during(tokens_so_far)` is called
    once after the last submit (with 0) and after each delta (to inject a failure); it returns True
    once it has acted."""
    deltas: queue.SimpleQueue = queue.SimpleQueue()
    got: dict[str, dict[int, list[int]]] = {rid: {} for rid in requests}
    for rid, (prompt, params) in requests.items():
        dep.submit(rid, prompt, params, deltas.put)
    finished, total, acted = 0, 0, during is None
    if not acted:
        acted = during(0)
    deadline = time.time() + timeout
    while finished < len(requests):
        d = deltas.get(timeout=max(1.0, deadline - time.time()))
        assert not isinstance(d, BaseException), d
        for o in d.outputs:
            got[d.request_id].setdefault(o.index, []).extend(o.token_ids)
            total += len(o.token_ids)
        finished += d.finished
        if not acted:
            acted = during(total)
    assert acted, "the failure was never injected"
    return got


def wait_healthy(dep, timeout: float = 120.0) -> bool:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(s["healthy"] for s in dep.status()):
            return True
        time.sleep(0.5)
    return False
