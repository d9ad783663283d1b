"""KV blocks between replicas through Ray's object store: the transport of a prefill pool on Ray.

`send` copies the blocks (every layer) to host memory and `ray.put`s them; the ticket carries the
ObjectRef, which travels to the decode rank inside the handoff (Ray tracks it as borrowed, and
moves the bytes between nodes when the decode rank is elsewhere). The prefill rank owns the
object and keeps its reference until the decode side's acknowledgement, then `release` drops it.
If the prefill rank dies first, the object dies with its owner and `receive` raises
`TransferError`, which the decode side answers by prefilling the sample itself.

On GPUs the payload goes through host memory; a GPU-direct path (NCCL between groups, NIXL) is
not implemented.
"""

from __future__ import annotations

import uuid

import ray
import torch

from moecluster.workers.transfer.kv_transfer import KVTicket, TransferError, gather_blocks, scatter_blocks

RECEIVE_TIMEOUT_S = 60.0


class ObjectStoreTransfer:
    def __init__(self, receive_timeout_s: float = RECEIVE_TIMEOUT_S) -> None:
        self.receive_timeout_s = receive_timeout_s
        self._staged: dict[str, ray.ObjectRef] = {}

    def send(self, caches: list[torch.Tensor], blocks: list[int]) -> KVTicket:
        payload = gather_blocks(caches, blocks).cpu().contiguous()  # (layers, n, block_size, latent_dim)
        ref = ray.put(payload)
        key = uuid.uuid4().hex
        self._staged[key] = ref
        return KVTicket("ray", key, len(blocks), tuple(payload.shape), str(payload.dtype), {"ref": ref})

    def receive(self, ticket: KVTicket, caches: list[torch.Tensor], blocks: list[int]) -> None:
        ref = ticket.detail.get("ref")
        if not isinstance(ref, ray.ObjectRef):
            raise TransferError(f"transfer {ticket.key}: the ticket carries no object reference ({ticket.transport})")
        try:
            payload = ray.get(ref, timeout=self.receive_timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as e:
            raise TransferError(f"transfer {ticket.key}: {type(e).__name__}: {e}") from e
        scatter_blocks(payload, caches, blocks, ticket)

    def release(self, ticket: KVTicket) -> None:
        self._staged.pop(ticket.key, None)

    @property
    def num_staged(self) -> int:
        return len(self._staged)
