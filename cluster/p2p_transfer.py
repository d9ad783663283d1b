"""KV blocks between pools over point-to-point torch.distributed groups: NCCL between GPUs (the
payload never leaves GPU memory), gloo on CPUs. The `p2p` transport of a prefill pool on Ray.

Which decode rank takes a handoff is decided after the prefill finished, so the decode side pulls:

* `send` (prefill rank) gathers the blocks of every layer into one payload on its device, keeps
  it under a key until `release` (the decode side's acknowledgement) and returns a ticket naming
  itself (its Ray actor handle and id).
* `receive` (decode rank) finds or opens its pair group with that prefill rank: a TCPStore of
  two on the decode rank's node, the prefill rank joins through the `kv_connect` actor method,
  both build a two-rank process group (prefill 0, decode 1) outside their expert-parallel group,
  so transfers never queue behind the group's collectives. It posts the receive, asks the
  prefill rank to `kv_push` the payload with a fresh tag, and waits for that call: if the
  prefill rank is gone or late, the pair group is dropped and `TransferError` tells the decode
  rank to prefill the sample itself (as with the object store).

Each pair group serves any number of transfers; tags keep concurrent ones apart.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import uuid
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

from moecluster.workers.transfer.kv_transfer import KVTicket, TransferError, gather_blocks, scatter_blocks

log = logging.getLogger(__name__)

RECEIVE_TIMEOUT_S = 60.0


def _pair_group(store: dist.Store, rank: int, cuda: bool, timeout_s: float) -> Any:
    if cuda:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=timeout_s)
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    return dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=timeout_s))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class P2PTransfer:
    def __init__(self, cuda: bool, receive_timeout_s: float = RECEIVE_TIMEOUT_S) -> None:
        self.cuda = cuda
        self.receive_timeout_s = receive_timeout_s
        self._staged: dict[str, torch.Tensor] = {}  # prefill side: payloads until released
        self._groups: dict[str, Any] = {}  # pair id -> process group
        self._tags = itertools.count()
        self._lock = threading.Lock()

    # ---- prefill side -------------------------------------------------------------------------
    def send(self, caches: list[torch.Tensor], blocks: list[int]) -> KVTicket:
        payload = gather_blocks(caches, blocks).contiguous()  # (layers, n, block_size, latent_dim)
        key = uuid.uuid4().hex
        with self._lock:
            self._staged[key] = payload
        ctx = ray.get_runtime_context()
        return KVTicket("p2p", key, len(blocks), tuple(payload.shape), str(payload.dtype),
                        {"actor": ctx.current_actor, "actor_id": ctx.get_actor_id()})

    def release(self, ticket: KVTicket) -> None:
        with self._lock:
            self._staged.pop(ticket.key, None)

    def connect(self, pair: str, host: str, port: int) -> None:
        """Join a decode rank's pair group as rank 0 (the `kv_connect` actor method)."""
        store = dist.TCPStore(host, port, 2, is_master=False, timeout=timedelta(seconds=self.receive_timeout_s))
        group = _pair_group(store, 0, self.cuda, self.receive_timeout_s)
        with self._lock:
            self._groups[pair] = group

    def push(self, pair: str, key: str, tag: int) -> None:
        """Send a staged payload to the pair's decode rank (the `kv_push` actor method)."""
        with self._lock:
            payload, group = self._staged.get(key), self._groups.get(pair)
        if payload is None:
            raise TransferError(f"transfer {key} is not staged here (released, or this rank restarted)")
        if group is None:
            raise TransferError(f"no pair group {pair} on this rank")
        group.send([payload], 1, tag).wait()  # the payload stays staged until released
    @property
    def num_staged(self) -> int:
        return len(self._staged)

    # ---- decode side --------------------------------------------------------------------------
    def receive(self, ticket: KVTicket, caches: list[torch.Tensor], blocks: list[int]) -> None:
        actor = ticket.detail.get("actor")
        if actor is None:
            raise TransferError(f"transfer {ticket.key}: the ticket names no sender ({ticket.transport})")
        pair = f"{ticket.detail['actor_id']}->{ray.get_runtime_context().get_actor_id()}"
        try:
            group = self._groups.get(pair) or self._open(actor, pair)
            payload = torch.empty(ticket.shape, dtype=getattr(torch, ticket.dtype.removeprefix("torch.")),
                                  device=caches[0].device)
            tag = next(self._tags)
            # Ask first, then post: NCCL sets a pair's communicator up at its first send / recv,
            # blocking until both sides are in it.
            pushed = actor.kv_push.remote(pair, ticket.key, tag)
            work = group.recv([payload], 0, tag)
            ray.get(pushed, timeout=self.receive_timeout_s)
            work.wait()  # orders the scatter below after the receive on this stream
        except (ray.exceptions.RayError, TimeoutError, RuntimeError) as e:
            self._drop(pair)
            raise TransferError(f"transfer {ticket.key}: {type(e).__name__}: {e}") from e
        scatter_blocks(payload, caches, blocks, ticket)

    def _open(self, actor: Any, pair: str) -> Any:
        host, port = ray.util.get_node_ip_address(), _free_port()
        store = dist.TCPStore(host, port, 2, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=self.receive_timeout_s))
        joined = actor.kv_connect.remote(pair, host, port)
        group = _pair_group(store, 1, self.cuda, self.receive_timeout_s)  # gloo meets its peer here
        ray.get(joined, timeout=self.receive_timeout_s)
        self._groups[pair] = group
        log.info("opened KV pair group %s (%s)", pair, "nccl" if self.cuda else "gloo")
        return group

    def _drop(self, pair: str) -> None:
        group = self._groups.pop(pair, None)
        abort = getattr(group, "abort", None)
        if abort is not None:
            try:
                abort()
            except RuntimeError:
                pass
