"""KV blocks between pools over point-to-point torch.distributed groups: NCCL between GPUs (the
payload never leaves GPU memory), gloo on CPUs. The `p2p` transport of a prefill pool on Ray.

Which decode rank takes a handoff is decided after the prefill finished, so the decode side pulls:

* `send` (prefill rank) records which cache blocks hold the sample (the engine keeps them until
  the decode side's acknowledgement) and returns a ticket naming itself (its Ray actor handle and
  id). Nothing is copied yet: a handoff waiting for room on the decode pool costs no memory.
* `receive` (decode rank) finds or opens its pair group with that prefill rank: a TCPStore of
  two on the decode rank's node, the prefill rank joins through the `kv_connect` actor method,
  both build a two-rank process group (prefill 0, decode 1) outside their expert-parallel group,
  so transfers never queue behind the group's collectives. It asks the prefill rank to `kv_push`
  (gather the blocks of every layer into one payload and send it), posts the receive, and waits
  for both with a deadline. A prefill rank that is gone, late, or no longer holds the sample
  gives `TransferError`, and the decode rank prefills the sample itself (as with the object
  store); a rank that did not answer, or whose pair failed and that Ray then reports dead, is
  remembered, so its other handoffs fail at once.

A pair carries one transfer at a time (the decode rank's engine thread is the only receiver);
tags only label them. A prefill rank asked to push a sample it no longer holds still sends a
payload of the right shape (zeros, flagged as missing), so the pair stays in step.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

from moecluster.workers.transfer.kv_transfer import KVTicket, TransferError, gather_blocks, payload_dtype, scatter_blocks

log = logging.getLogger(__name__)

RECEIVE_TIMEOUT_S = 60.0


def _pair_group(store: dist.Store, rank: int, cuda: bool, timeout_s: float) -> Any:
    if cuda:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=timeout_s)
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    return dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=timeout_s))


def free_port() -> int:
    """A TCP port free on this node right now (for a rendezvous store)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class P2PTransfer:
    def __init__(self, cuda: bool, receive_timeout_s: float = RECEIVE_TIMEOUT_S) -> None:
        self.cuda = cuda
        self.receive_timeout_s = receive_timeout_s
        self._staged: dict[str, tuple[list[torch.Tensor], list[int]]] = {}  # prefill side: caches, blocks
        self._groups: dict[str, Any] = {}  # pair id -> process group
        self._dead: set[str] = set()  # prefill actor ids that failed to answer (decode side)
        self._tags = itertools.count()
        self._lock = threading.Lock()

    # ---- prefill side -------------------------------------------------------------------------
    def send(self, caches: list[torch.Tensor], blocks: list[int]) -> KVTicket:
        key = uuid.uuid4().hex
        with self._lock:
            self._staged[key] = (caches, list(blocks))
        ctx = ray.get_runtime_context()
        shape = (len(caches), len(blocks), *caches[0].shape[1:])  # (layers, n, block_size, latent_dim)
        return KVTicket("p2p", key, len(blocks), shape, str(caches[0].dtype),
                        {"actor": ctx.current_actor, "actor_id": ctx.get_actor_id()})

    def release(self, ticket: KVTicket) -> None:
        with self._lock:
            self._staged.pop(ticket.key, None)

    def connect(self, pair: str, host: str, port: int) -> None:
        """Join a decode rank's pair group as rank 0 (the `kv_connect` actor method); a decode rank
        that reconnects (it restarted, or dropped the pair after a failure) replaces the old group."""
        store = dist.TCPStore(host, port, 2, is_master=False, timeout=timedelta(seconds=self.receive_timeout_s))
        group = _pair_group(store, 0, self.cuda, self.receive_timeout_s)
        with self._lock:
            old, self._groups[pair] = self._groups.get(pair), group
        _abort(old)

    def push(self, pair: str, key: str, tag: int, shape: tuple[int, ...], dtype: str) -> bool:
        """Send a staged sample's blocks to the pair's decode rank (the `kv_push` actor method).
        False (after sending zeros of the asked shape, to keep the pair in step) when this rank no
        longer holds the sample."""
        with self._lock:
            staged, group = self._staged.get(key), self._groups.get(pair)
        if group is None:
            raise TransferError(f"no pair group {pair} on this rank")
        if staged is None:
            device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
            group.send([torch.zeros(shape, dtype=payload_dtype(dtype), device=device)], 1, tag).wait()
            return False
        payload = gather_blocks(*staged).contiguous()  # (layers, n, block_size, latent_dim)
        group.send([payload], 1, tag).wait()  # NCCL: the stream keeps the payload alive until sent
        return True

    @property
    def num_staged(self) -> int:
        return len(self._staged)

    # ---- decode side --------------------------------------------------------------------------
    def receive(self, ticket: KVTicket, caches: list[torch.Tensor], blocks: list[int]) -> None:
        actor, sender = ticket.detail.get("actor"), ticket.detail.get("actor_id")
        if actor is None:
            raise TransferError(f"transfer {ticket.key}: the ticket names no sender ({ticket.transport})")
        if sender in self._dead:
            raise TransferError(f"transfer {ticket.key}: prefill rank {sender} stopped answering earlier")
        pair = f"{sender}->{ray.get_runtime_context().get_actor_id()}"
        deadline = time.monotonic() + self.receive_timeout_s
        try:
            group = self._groups.get(pair) or self._open(actor, pair)
            payload = torch.empty(ticket.shape, dtype=payload_dtype(ticket.dtype), device=caches[0].device)
            tag = next(self._tags)
            # Ask first, then post: NCCL sets a pair's communicator up at its first send / recv,
            # blocking until both sides are in it.
            pushed = actor.kv_push.remote(pair, ticket.key, tag, tuple(ticket.shape), ticket.dtype)
            work = group.recv([payload], 0, tag)
            held = ray.get(pushed, timeout=max(0.1, deadline - time.monotonic()))
            _wait(work, deadline, self.cuda)  # the data itself, not only the request, within the deadline
        except (ray.exceptions.RayError, TimeoutError, RuntimeError) as e:
            if isinstance(e, (ray.exceptions.RayActorError, TimeoutError, ray.exceptions.GetTimeoutError)) or _gone(actor):
                self._dead.add(sender)
            self._drop(pair)
            raise TransferError(f"transfer {ticket.key}: {type(e).__name__}: {e}") from e
        if not held:
            raise TransferError(f"transfer {ticket.key}: the prefill rank no longer holds this sample")
        scatter_blocks(payload, caches, blocks, ticket)

    def _open(self, actor: Any, pair: str) -> Any:
        ray.get(actor.address.remote(), timeout=min(10.0, self.receive_timeout_s))  # alive? (fails fast if not)
        host, port = ray.util.get_node_ip_address(), free_port()
        store = dist.TCPStore(host, port, 2, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=self.receive_timeout_s))
        joined = actor.kv_connect.remote(pair, host, port)
        group = _pair_group(store, 1, self.cuda, self.receive_timeout_s)  # gloo meets its peer here
        ray.get(joined, timeout=self.receive_timeout_s)
        self._groups[pair] = group
        log.info("opened KV pair group %s (%s)", pair, "nccl" if self.cuda else "gloo")
        return group

    def _drop(self, pair: str) -> None:
        _abort(self._groups.pop(pair, None))


def _gone(actor: Any, timeout_s: float = 2.0) -> bool:
    """Whether a sender whose pair group failed (a gloo / NCCL error, which may come before Ray
    reports the actor dead) is dead: Ray answers a call to a dead actor at once."""
    try:
        ray.get(actor.address.remote(), timeout=timeout_s)
    except ray.exceptions.RayActorError:
        return True
    except ray.exceptions.RayError:
        pass  # busy or slow: not known dead
    return False


def _wait(work: Any, deadline: float, cuda: bool) -> None:
    """Until a receive completed, or TimeoutError at the deadline. NCCL work completes on its
    own (polled: waiting would only order streams); gloo's receive completes inside wait."""
    if not cuda:
        if not work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic()))):
            raise TimeoutError("the payload did not arrive in time")
        return
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise TimeoutError("the payload did not arrive in time")
        time.sleep(0.0002)


def _abort(group: Any) -> None:
    abort = getattr(group, "abort", None)
    if abort is not None:
        try:
            abort()
        except RuntimeError:
            pass
