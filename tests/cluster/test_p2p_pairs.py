"""P2PTransfer between two Ray actors over gloo: blocks arrive exactly, a released sample fails
cleanly and leaves the pair usable, a dead sender fails fast and is remembered."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")


class _Rank:
    def __init__(self, seed: int) -> None:
        from moecluster.cluster.p2p_transfer import P2PTransfer

        self.t = P2PTransfer(cuda=False, receive_timeout_s=8.0)
        g = torch.Generator().manual_seed(seed)
        self.caches = [torch.randn(6, 4, 5, generator=g) for _ in range(3)]  # (blocks, block_size, dim) x layers

    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", 0)

    def send(self, blocks: list[int]):  # noqa: ANN201
        return self.t.send(self.caches, blocks)

    def release(self, ticket) -> None:  # noqa: ANN001
        self.t.release(ticket)

    def staged(self) -> int:
        return self.t.num_staged

    def blocks(self, ids: list[int]) -> list:
        return [c[ids].tolist() for c in self.caches]

    def kv_connect(self, pair: str, host: str, port: int) -> None:
        self.t.connect(pair, host, port)

    def kv_push(self, pair: str, key: str, tag: int, shape: tuple[int, ...], dtype: str) -> bool:
        return self.t.push(pair, key, tag, shape, dtype)

    def receive(self, ticket, into: list[int]):  # noqa: ANN001, ANN201
        from moecluster.workers.transfer.kv_transfer import TransferError

        try:
            self.t.receive(ticket, self.caches, into)
        except TransferError as e:
            return str(e)
        return [c[into].tolist() for c in self.caches]


def _wait_dead(actor: object, limit_s: float = 30.0) -> None:
    """Until calls to a killed actor fail (ray.kill only asks for the kill)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.staged.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.05)
    raise AssertionError(f"the killed actor still answered after {limit_s} s")


def test_pairs_move_blocks_and_fail_cleanly(local_ray) -> None:
    actor = ray.remote(max_concurrency=4)(_Rank)
    prefill, decode = actor.remote(1), actor.remote(2)
    want = ray.get(prefill.blocks.remote([4, 1]))
    ticket = ray.get(prefill.send.remote([4, 1]))
    assert ray.get(decode.receive.remote(ticket, [0, 5])) == want  # into other block ids
    ray.get(prefill.release.remote(ticket))
    assert ray.get(prefill.staged.remote()) == 0

    gone = ray.get(prefill.send.remote([2]))
    ray.get(prefill.release.remote(gone))  # e.g. an abort won the race with the transfer
    assert "no longer holds" in ray.get(decode.receive.remote(gone, [3]))
    again = ray.get(prefill.send.remote([3]))  # the pair is still in step
    assert ray.get(decode.receive.remote(again, [2])) == ray.get(prefill.blocks.remote([3]))

    late = ray.get(prefill.send.remote([0]))
    ray.kill(prefill)
    _wait_dead(prefill)  # ray.kill returns before the process is gone: a push answered meanwhile is valid
    start = time.monotonic()
    assert isinstance(ray.get(decode.receive.remote(late, [1])), str)  # an error message, not blocks
    assert time.monotonic() - start < 20
    start = time.monotonic()
    assert "stopped answering" in ray.get(decode.receive.remote(late, [1]))
    assert time.monotonic() - start < 2
