"""Moving a request's latent KV blocks from a prefill worker's cache to a decode worker's.

Transfers are block-granular and cover every layer: the payload of n blocks is one
(layers, n, block_size, latent_dim) tensor. A sender stages the blocks and returns a `KVTicket`,
a small picklable description the decode side receives with the handoff message; the receiver
writes the payload into blocks it allocated and raises `TransferError` if anything is missing,
the wrong shape or late, so a request is never decoded from partial blocks. After a successful
receive the decode side acknowledges and the sender `release`s what it staged; the prefill side
frees its blocks only then.

Three transports: `InProcessTransfer` (both caches in one process: a direct copy),
`SharedMemoryTransfer` (between processes on one host: a POSIX shared-memory segment per
transfer), `DistributedTransfer` (torch.distributed point-to-point send/recv: NCCL between GPUs,
gloo on the CPU).
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any, Protocol

import torch
import torch.distributed as dist


class TransferError(RuntimeError):
    pass


@dataclass(frozen=True)
class KVTicket:
    transport: str
    key: str  # unique per transfer
    num_blocks: int
    shape: tuple[int, ...]  # (layers, num_blocks, block_size, latent_dim)
    dtype: str
    detail: dict[str, Any] = field(default_factory=dict)  # transport specifics (segment name, peer rank, tag)


class KVTransfer(Protocol):
    def send(self, caches: list[torch.Tensor], blocks: list[int]) -> KVTicket: ...

    def receive(self, ticket: KVTicket, caches: list[torch.Tensor], blocks: list[int]) -> None: ...

    def release(self, ticket: KVTicket) -> None: ...


def gather_blocks(caches: list[torch.Tensor], blocks: list[int]) -> torch.Tensor:
    """(layers, n, block_size, latent_dim) copy of the given blocks of every layer."""
    index = torch.tensor(blocks, dtype=torch.int64, device=caches[0].device)
    return torch.stack([cache.index_select(0, index) for cache in caches])


def scatter_blocks(payload: torch.Tensor, caches: list[torch.Tensor], blocks: list[int], ticket: KVTicket) -> None:
    expected = (len(caches), len(blocks), *caches[0].shape[1:])
    if tuple(payload.shape) != expected or tuple(ticket.shape) != expected:
        raise TransferError(f"transfer {ticket.key}: payload {tuple(payload.shape)}, expected {expected}")
    index = torch.tensor(blocks, dtype=torch.int64, device=caches[0].device)
    for layer, cache in enumerate(caches):
        cache.index_copy_(0, index, payload[layer].to(device=cache.device, dtype=cache.dtype))


def payload_dtype(name: str) -> torch.dtype:
    """A ticket's dtype name (`str(torch.bfloat16)`) back to the dtype."""
    return getattr(torch, name.removeprefix("torch."))


class InProcessTransfer:
    """Both engines in one process: stage a copy, hand it over by reference."""

    def __init__(self) -> None:
        self._staged: dict[str, torch.Tensor] = {}

    def send(self, caches: list[torch.Tensor], blocks: list[int]) -> KVTicket:
        payload = gather_blocks(caches, blocks)
        key = uuid.uuid4().hex
        self._staged[key] = payload
        return KVTicket("inprocess", key, len(blocks), tuple(payload.shape), str(payload.dtype))

    def receive(self, ticket: KVTicket, caches: list[torch.Tensor], blocks: list[int]) -> None:
        payload = self._staged.get(ticket.key)
        if payload is None:
            raise TransferError(f"transfer {ticket.key} is not staged (released or never sent)")
        scatter_blocks(payload, caches, blocks, ticket)

    def release(self, ticket: KVTicket) -> None:
        self._staged.pop(ticket.key, None)


class SharedMemoryTransfer:
    """Between processes of one host: one shared-memory segment per transfer, unlinked on release."""

    def __init__(self) -> None:
        self._segments: dict[str, shared_memory.SharedMemory] = {}

    def send(self, caches: list[torch.Tensor], blocks: list[int]) -> KVTicket:
        payload = gather_blocks(caches, blocks).cpu().contiguous()
        raw = payload.view(torch.uint8).reshape(-1)
        segment = shared_memory.SharedMemory(create=True, size=max(1, raw.numel()))
        torch.frombuffer(segment.buf, dtype=torch.uint8, count=raw.numel()).copy_(raw)
        self._segments[segment.name] = segment
        return KVTicket("shm", segment.name, len(blocks), tuple(payload.shape), str(payload.dtype),
                        {"nbytes": raw.numel()})

    def receive(self, ticket: KVTicket, caches: list[torch.Tensor], blocks: list[int]) -> None:
        try:
            segment = shared_memory.SharedMemory(name=ticket.key)
        except FileNotFoundError as e:
            raise TransferError(f"shared-memory segment {ticket.key} is gone") from e
        try:
            nbytes = ticket.detail["nbytes"]
            if segment.size < nbytes:
                raise TransferError(f"segment {ticket.key} holds {segment.size} bytes, expected {nbytes}")
            raw = torch.frombuffer(segment.buf, dtype=torch.uint8, count=nbytes).clone()
            scatter_blocks(raw.view(payload_dtype(ticket.dtype)).reshape(ticket.shape), caches, blocks, ticket)
        finally:
            segment.close()

    def release(self, ticket: KVTicket) -> None:
        segment = self._segments.pop(ticket.key, None)
        if segment is not None:
            segment.close()
            segment.unlink()


class DistributedTransfer:
    """Point-to-point over an initialised torch.distributed group (NCCL on GPUs, gloo on CPU).

    `send` posts a non-blocking send to `peer`; the matching `receive` on the peer posts the
    receive. Both sides must handle tickets in the same order (the handoff channel keeps order).
    Give it a group of its own (`dist.new_group`): NCCL serializes point-to-point ops with every
    other op of their group, so a payload waiting for its receive would block the group's
    collectives, and a control plane sharing the group can deadlock.
    """

    def __init__(self, peer: int, group: Any = None, device: torch.device | str | None = None) -> None:
        """Collective over the pair: both sides construct theirs at the same point. NCCL sets up a
        point-to-point connection with a blocking handshake on the first send/recv, so one
        exchange here keeps the first real `send` from blocking until the peer happens to post."""
        self.peer, self.group = peer, group
        self._pending: dict[str, tuple[Any, torch.Tensor]] = {}
        self._tags = itertools.count()
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        mine, theirs = torch.zeros(1, device=device), torch.empty(1, device=device)
        ops = [dist.P2POp(dist.isend, mine, peer, group), dist.P2POp(dist.irecv, theirs, peer, group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def send(self, caches: list[torch.Tensor], blocks: list[int]) -> KVTicket:
        payload = gather_blocks(caches, blocks).contiguous()
        tag = next(self._tags)
        work = dist.isend(payload, dst=self.peer, group=self.group, tag=tag)
        ticket = KVTicket("dist", f"{dist.get_rank()}-{tag}", len(blocks), tuple(payload.shape), str(payload.dtype),
                          {"src": dist.get_rank(), "tag": tag})
        self._pending[ticket.key] = (work, payload)
        return ticket

    def receive(self, ticket: KVTicket, caches: list[torch.Tensor], blocks: list[int]) -> None:
        payload = torch.empty(ticket.shape, dtype=payload_dtype(ticket.dtype), device=caches[0].device)
        try:
            dist.recv(payload, src=ticket.detail["src"], group=self.group, tag=ticket.detail["tag"])
        except RuntimeError as e:
            raise TransferError(f"transfer {ticket.key} failed: {e}") from e
        scatter_blocks(payload, caches, blocks, ticket)

    def release(self, ticket: KVTicket) -> None:
        pending = self._pending.pop(ticket.key, None)
        if pending is not None:
            pending[0].wait()
