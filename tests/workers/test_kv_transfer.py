"""KV transfer between prefill and decode caches: three transports, acks, failure handling."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import multiprocessing as mp

from moecluster import LLM, SamplingParams
from tests.two_ranks import run_two_ranks
from moecluster.workers.transfer.kv_transfer import (
    DistributedTransfer,
    InProcessTransfer,
    SharedMemoryTransfer,
    TransferError,
)

LAYERS, BLOCKS, BLOCK, DIM = 3, 12, 4, 10


def caches(fill: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(BLOCKS, BLOCK, DIM, generator=g) if fill else torch.zeros(BLOCKS, BLOCK, DIM)
            for _ in range(LAYERS)]


@pytest.mark.parametrize("transport", [InProcessTransfer, SharedMemoryTransfer])
def test_blocks_arrive_intact(transport) -> None:  # noqa: ANN001
    src, dst = caches(True), caches(False)
    t = transport()
    ticket = t.send(src, [7, 2, 9])
    t.receive(ticket, dst, [0, 5, 1])
    for s, d in zip(src, dst):
        assert torch.equal(d[[0, 5, 1]], s[[7, 2, 9]])
        assert not d[[2, 3, 4, 6, 7, 8, 9, 10, 11]].any()  # nothing else written
    t.release(ticket)
    with pytest.raises(TransferError):
        t.receive(ticket, dst, [0, 5, 1])  # released: gone


def test_wrong_block_count_is_refused() -> None:
    t = InProcessTransfer()
    ticket = t.send(caches(True), [1, 2])
    with pytest.raises(TransferError, match="expected"):
        t.receive(ticket, caches(False), [1, 2, 3])


def _shm_receiver(name: str, shape: tuple, nbytes: int, queue) -> None:  # noqa: ANN001
    from moecluster.workers.transfer.kv_transfer import KVTicket, SharedMemoryTransfer

    dst = caches(False)
    SharedMemoryTransfer().receive(KVTicket("shm", name, 2, shape, "torch.float32", {"nbytes": nbytes}), dst, [3, 4])
    queue.put([d[[3, 4]].tolist() for d in dst])  # plain lists: the child exits before the parent reads


def test_shared_memory_between_processes() -> None:
    src = caches(True)
    t = SharedMemoryTransfer()
    ticket = t.send(src, [5, 6])
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_shm_receiver, args=(ticket.key, ticket.shape, ticket.detail["nbytes"], queue))
    proc.start()
    got = queue.get(timeout=60)
    proc.join(60)
    assert proc.exitcode == 0
    for s, g in zip(src, got):
        assert torch.equal(torch.tensor(g), s[[5, 6]])
    t.release(ticket)


def _dist_worker(rank: int, port: int, queue) -> None:  # noqa: ANN001
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    t = DistributedTransfer(peer=1 - rank, group=dist.new_group([0, 1]))
    if rank == 0:
        tickets = [t.send(caches(True), [1, 2]), t.send(caches(True), [8])]
        dist.broadcast_object_list(tickets, src=0)
        dist.barrier()  # the receiver acknowledged
        for ticket in tickets:
            t.release(ticket)
    else:
        tickets = [None, None]
        dist.broadcast_object_list(tickets, src=0)
        dst = caches(False)
        t.receive(tickets[0], dst, [10, 11])
        t.receive(tickets[1], dst, [0])
        dist.barrier()
        queue.put([d[[10, 11, 0]].tolist() for d in dst])
    dist.destroy_process_group()


def test_distributed_send_recv_over_gloo() -> None:
    (got,) = run_two_ranks(_dist_worker, results=1, timeout=120)
    src = caches(True)
    for s, g in zip(src, got):
        assert torch.equal(torch.tensor(g), s[[1, 2, 8]])


class FlakyTransfer(InProcessTransfer):
    """Fails the first `failures` receives of every ticket."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures, self.seen = failures, {}

    def receive(self, ticket, caches, blocks) -> None:  # noqa: ANN001
        self.seen[ticket.key] = self.seen.get(ticket.key, 0) + 1
        if self.seen[ticket.key] <= self.failures:
            raise TransferError("injected")
        super().receive(ticket, caches, blocks)


@pytest.mark.parametrize("failures", [1, 5])  # 1: a retry succeeds; 5: retries run out, decode re-prefills
def test_failed_transfers_never_change_answers(tiny_checkpoint, failures: int) -> None:
    ckpt = tiny_checkpoint(num_layers=2)
    prompts = [[(11 * i + j) % 900 + 2 for j in range(9 + 7 * i)] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    plain = LLM(ckpt, dtype="float32", device="cpu", block_size=16, num_kv_blocks=64)
    want = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": p} for p in prompts], params)]

    split = LLM(ckpt, dtype="float32", device="cpu", block_size=16, num_kv_blocks=64, disaggregate=True)
    core = split.engine.core
    flaky = FlakyTransfer(failures)
    core.prefill.transfer = core.decode.transfer = flaky
    got = [o.outputs[0].token_ids for o in split.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert got == want
    assert (core.num_refills > 0) == (failures > core.max_retries)
    assert core.prefill.stats().kv_usage == 0.0 and core.decode.stats().kv_usage == 0.0
    assert not flaky._staged  # every staged payload released


def test_seeded_sampling_survives_the_split(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint(num_layers=2)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=8, n=3, ignore_eos=True)
    prompt = [{"prompt_token_ids": list(range(40, 75))}]
    one = LLM(ckpt, dtype="float32", device="cpu", block_size=16, num_kv_blocks=64).generate(prompt, params)[0]
    two = LLM(ckpt, dtype="float32", device="cpu", block_size=16, num_kv_blocks=64, disaggregate=True).generate(prompt, params)[0]
    assert [c.token_ids for c in one.outputs] == [c.token_ids for c in two.outputs]
