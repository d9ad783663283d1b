"""One expert-parallel rank as a Ray actor: its engine and lockstep loop on a background thread.

The actor is threaded (Ray `max_concurrency`): `poll` can wait for events while `submit` and
`abort` come in. A rank of a prefill or decode pool runs its engine in that role, with KV blocks
travelling between pools through Ray's object store (`object_store_transfer.py`) or a
point-to-point group per rank pair (`p2p_transfer.py`: NCCL between GPUs; `kv_connect` and
`kv_push` are its prefill side). The group's torch.distributed rendezvous goes through Ray: rank 0 reports an
address and a free port on its node, and every rank's `start` joins with them.
"""

from __future__ import annotations

import logging
import queue
import sys
from collections import deque
import threading
import time
from typing import Any

import ray

from moecluster.cluster.metrics import RayMetrics, publish_engine_stats
from moecluster.cluster.object_store_transfer import ObjectStoreTransfer
from moecluster.cluster.p2p_transfer import P2PTransfer, free_port
from moecluster.workers.engine.engine_config import EngineConfig
from moecluster.workers.engine.engine_core import Role
from moecluster.workers.engine.ep_rank import join_group, lockstep_loop
from moecluster.workers.engine.request_limits import RequestLimits
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.transfer.handoff import KVHandoff


PUBLISH_INTERVAL_S = 1.0
SWITCH_INTERVAL_S = 0.001  # GIL switch interval of the rank actors and of the driver (serve.py)
QUEUE_HORIZON_S = 60.0  # health reports the queue times of this many recent seconds (for the autoscaler)


def _log_to_driver(name: str) -> None:
    """INFO lines of our loggers (weight-loading progress, the engine's notes) on this actor's
    stderr, which Ray forwards to the driver's console and the dashboard's logs."""
    root = logging.getLogger("moecluster")
    if not any(getattr(h, "moecluster_actor", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s"))
        handler.moecluster_actor = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(logging.INFO)


class RankActor:
    def __init__(self, cfg: EngineConfig, rank: int, world: int, replica: str = "replica", role: Role = "both") -> None:
        _log_to_driver(f"{replica}-rank-{rank}")
        # The engine loop and the driver's polls share this process's GIL: with Python's 5 ms
        # default a poll can wait a whole decode step (with the driver's 1 ms: serve.py).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.cfg, self.rank, self.world, self.role = cfg, rank, world, role
        self.tags = {"replica": replica, "rank": str(rank)}
        self.metrics = RayMetrics()
        self._published, self._preemptions = 0.0, 0
        self._recent_queue: deque[tuple[float, float]] = deque(maxlen=4096)  # (when drained, queue seconds)
        self.inbox: queue.Queue[tuple] = queue.Queue()
        self.outbox: queue.Queue[tuple] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._core: Any = None
        self._transfer: Any = None

    def address(self) -> tuple[str, int]:
        """Where the group's rendezvous listens (asked of rank 0)."""
        return ray.util.get_node_ip_address(), free_port()

    def start(self, master_addr: str, port: int) -> RequestLimits:
        """Join the group and build the engine (all ranks at once), then step in the background."""
        if self.role != "both":
            cuda = self.cfg.resolved_device().type == "cuda"
            self._transfer = P2PTransfer(cuda) if self.cfg.kv_transfer == "p2p" else ObjectStoreTransfer()
        self._core, device = join_group(self.rank, self.world, master_addr, port, self.cfg, self.role, self._transfer)
        self._thread = threading.Thread(
            target=self._run, args=(device,), name=f"moecluster-rank-{self.rank}", daemon=True
        )
        self._thread.start()
        return self._core.limits

    def _run(self, device: Any) -> None:
        try:
            lockstep_loop(self._core, self.rank, device, self.cfg, self.inbox, self.outbox)
            self.outbox.put(("stopped", self.rank, None))
        except BaseException as e:  # noqa: BLE001 - the replica must hear why this rank stopped
            self.outbox.put(("error", self.rank, repr(e)))

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None) -> None:
        self.inbox.put(("add", request_id, prompt_ids, params, prompt))

    def submit_prefilled(self, inner_id: str, handoff: KVHandoff) -> None:
        """A decode rank: continue a sample a prefill rank handed over (its blocks in the object store)."""
        self.inbox.put(("prefilled", inner_id, handoff))

    def ack(self, request_id: str, sample_index: int) -> None:
        """A prefill rank: the decode side took this sample; free its blocks."""
        self.inbox.put(("ack", request_id, sample_index))

    def kv_connect(self, pair: str, host: str, port: int) -> None:
        """A prefill rank (p2p transfers): join a decode rank's pair group."""
        self._p2p().connect(pair, host, port)

    def kv_push(self, pair: str, key: str, tag: int, shape: tuple[int, ...], dtype: str) -> bool:
        """A prefill rank (p2p transfers): send a staged sample's blocks to the decode rank that asks."""
        return self._p2p().push(pair, key, tag, shape, dtype)

    def _p2p(self) -> P2PTransfer:
        if not isinstance(self._transfer, P2PTransfer):
            raise RuntimeError(f"rank {self.rank} ({self.role}) does not use p2p KV transfers")
        return self._transfer

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def rebalance(self) -> None:
        self.inbox.put(("rebalance",))

    def poll(self, wait_s: float = 0.05) -> list[tuple]:
        """Events since the last poll (waiting up to wait_s for the first). Outputs come without
        their prompts (`ep_rank`'s outbox form): the deployment puts its own copy back."""
        events = []
        try:
            events.append(self.outbox.get(timeout=wait_s))
            while True:
                events.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        self._publish(events)
        return events

    def _publish(self, events: list[tuple]) -> None:
        """At most once a second: this rank's engine gauges; every EPLB report as it comes."""
        for kind, _, payload in events:
            if kind == "eplb":
                self.metrics.gauge("moecluster_expert_imbalance", payload.balance_after, self.tags)
        if self._core is not None:
            now = time.monotonic()
            for seconds in self._core.take_queue_times():
                self.metrics.observe("moecluster_queue_seconds", seconds, self.tags)
                self._recent_queue.append((now, seconds))
        now = time.monotonic()
        if self._core is not None and now - self._published >= PUBLISH_INTERVAL_S:
            self._published = now
            self._preemptions = publish_engine_stats(self.metrics, self._core.stats(), self.tags, self._preemptions)

    def health(self) -> dict[str, Any]:
        alive = self._thread is not None and self._thread.is_alive()
        core = self._core
        stats = core.stats() if core is not None else None
        cached = core.blocks.cached_hashes() if core is not None else []
        cutoff = time.monotonic() - QUEUE_HORIZON_S
        queue_times = [v for t, v in list(self._recent_queue) if t >= cutoff]
        return {"rank": self.rank, "role": self.role, "alive": alive, "stats": stats, "cached": cached,
                "queue_times": queue_times}

    def step_profile(self, clear: bool = False) -> dict[str, dict[str, float]]:
        """Per-phase step times of the recent steps (`workers/engine/step_timer.py`); clear starts afresh."""
        if self._core is None:
            return {}
        snapshot: dict[str, dict[str, float]] = self._core.timer.snapshot()
        totals = self._core.timer.decode_only()
        if totals is not None:  # not a phase: `bench serve` reads it for its rank-side decode rate
            snapshot["decode_only"] = totals
        if clear:
            self._core.timer.clear()
        return snapshot

    def stop(self, timeout: float = 30.0) -> None:
        self.inbox.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)
