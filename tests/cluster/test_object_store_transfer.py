"""KV blocks through Ray's object store: exact round trip, and a clear error when the owner died."""

from __future__ import annotations

import time

import pytest
import torch

ray = pytest.importorskip("ray")

from moecluster.cluster.object_store_transfer import ObjectStoreTransfer  # noqa: E402
from moecluster.workers.transfer.kv_transfer import TransferError  # noqa: E402


def caches(layers: int = 3, blocks: int = 8, block_size: int = 4, dim: int = 6) -> list[torch.Tensor]:
    return [torch.randn(blocks, block_size, dim) for _ in range(layers)]


class Sender:
    """A prefill rank's side: stages blocks and returns the ticket."""

    def __init__(self) -> None:
        self.transfer = ObjectStoreTransfer()
        self.caches = caches()

    def send(self, blocks: list[int]):  # noqa: ANN201
        return self.transfer.send(self.caches, blocks), [c[blocks] for c in self.caches]


def test_round_trip_writes_exactly_the_blocks(local_ray) -> None:
    src, dst = caches(), [torch.full((8, 4, 6), float("nan")) for _ in range(3)]
    t = ObjectStoreTransfer()
    ticket = t.send(src, [5, 1, 6])
    t.receive(ticket, dst, [0, 2, 7])
    for s, d in zip(src, dst):
        assert torch.equal(d[[0, 2, 7]], s[[5, 1, 6]])
        assert torch.isnan(d[[1, 3, 4, 5, 6]]).all()  # nothing else written
    assert t.num_staged == 1
    t.release(ticket)
    assert t.num_staged == 0


def test_payload_travels_between_actors_and_dies_with_its_owner(local_ray) -> None:
    sender = ray.remote(num_cpus=0)(Sender).remote()
    ticket, want = ray.get(sender.send.remote([2, 3]))
    dst = caches()
    ObjectStoreTransfer().receive(ticket, dst, [6, 0])
    for d, w in zip(dst, want):
        assert torch.equal(d[[6, 0]], w)

    orphan, orphan_want = ray.get(sender.send.remote([1]))
    ray.kill(sender)  # the prefill rank died before the decode side read its blocks
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(sender.send.remote([0]), timeout=30)
    # Until Ray has processed the owner's death a local copy may still be readable (then it must be
    # exact); after that the receive fails with a TransferError naming the transfer, never hangs.
    deadline = time.time() + 30
    with pytest.raises(TransferError, match=orphan.key):
        while time.time() < deadline:
            fresh = caches()
            ObjectStoreTransfer(receive_timeout_s=20).receive(orphan, fresh, [4])
            assert all(torch.equal(d[[4]], w) for d, w in zip(fresh, orphan_want))
            time.sleep(0.1)
