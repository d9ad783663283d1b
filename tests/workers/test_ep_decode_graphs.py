"""Expert-parallel decode steps through the graph path (gloo, CPU, capture off): each rank's MoE
layers dispatch with `GatherDispatch` inside the padded static batch, the lockstep loop agrees on
one size per step, an idle rank replays padding, EPLB moves experts mid-run, and the tokens
equal one process."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import pytest

from moecluster import LLM, SamplingParams
from tests.two_ranks import run_ranks

BLOCK, BLOCKS = 16, 48


def _prompts() -> list[list[int]]:
    return [[(11 * i + j) % 900 + 2 for j in range(5 + 7 * i)] for i in range(5)]


def _params(i: int) -> SamplingParams:
    # rank 1 takes requests 1 and 3 (odd), which finish well before rank 0's last one
    return SamplingParams(temperature=0.0, max_tokens=4 if i % 2 else 9 + 2 * i, ignore_eos=True)


def _worker(rank: int, world: int, port: int, results: Any, ckpt: str, rebalance: bool) -> None:
    from moecluster.workers.engine.cuda_graphs import DecodeGraphs
    from moecluster.workers.engine.engine_config import EngineConfig
    from moecluster.workers.engine.ep_rank import join_group, lockstep_loop
    from moecluster.workers.engine.outputs import from_wire
    from moecluster.workers.engine.kv_cache import allocate_kv_cache
    from moecluster.workers.engine.model_runner import ModelRunner

    cfg = EngineConfig(model=Path(ckpt), dtype="float32", device="cpu", block_size=BLOCK, num_kv_blocks=BLOCKS,
                       eplb_redundant_slots=4 if rebalance else 0)
    core, device = join_group(rank, world, "127.0.0.1", port, cfg)
    model = core.runner.model
    kv = allocate_kv_cache(model.cfg, BLOCKS + 1, BLOCK, model.dtype, "cpu")
    graphs = DecodeGraphs(model, kv, BLOCK, 4, 256, scratch_block=BLOCKS, capture=False)
    assert graphs.grouped
    sizes: list[int] = []
    run = graphs.run
    graphs.run = lambda scheduled, size=None, prev=None: (sizes.append(size), run(scheduled, size, prev))[1]  # type: ignore[method-assign]
    core.runner = ModelRunner(model, kv, BLOCK, graphs)
    inbox: queue.Queue = queue.Queue()
    outbox: queue.Queue = queue.Queue()
    mine = [i for i in range(5) if i % world == rank]
    for i in mine:
        inbox.put(("add", f"r{i}", _prompts()[i], _params(i), None))
    if rebalance and rank == 0:
        inbox.put(("rebalance",))
    loop = threading.Thread(target=lockstep_loop, args=(core, rank, device, cfg, inbox, outbox))
    loop.start()
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in mine}
    done: set[str] = set()
    eplb = []
    while len(done) < len(mine):
        kind, _, payload = outbox.get(timeout=120)
        if kind == "eplb":
            eplb.append(payload.moved_slots)
        elif kind == "out":
            for o in from_wire(payload):
                tokens[o.request_id] += o.outputs[0].token_ids
                if o.finished:
                    done.add(o.request_id)
    if rank == 0:
        inbox.put(("stop",))  # rank 0's last request outlives rank 1's: the group stops after both
    loop.join(timeout=120)
    results.put((rank, tokens, sizes, eplb))


@pytest.mark.parametrize("rebalance", [False, True])
def test_ep_graph_path_equals_single_process(tiny_checkpoint, rebalance: bool) -> None:
    ckpt = tiny_checkpoint(num_layers=2, quant="int4" if rebalance else "none")
    llm = LLM(ckpt, dtype="float32", device="cpu", block_size=BLOCK, num_kv_blocks=BLOCKS)
    want = {f"r{i}": o.outputs[0].token_ids
            for i, o in enumerate(llm.generate([{"prompt_token_ids": p} for p in _prompts()],
                                               [_params(i) for i in range(5)]))}
    got = run_ranks(_worker, 2, (str(ckpt), rebalance), results=2, timeout=240)
    by_rank = {rank: (tokens, sizes, eplb) for rank, tokens, sizes, eplb in got}
    for rank, (tokens, sizes, eplb) in by_rank.items():
        assert tokens == {k: v for k, v in want.items() if int(k[1:]) % 2 == rank}
        assert sizes and all(s in (1, 2, 4) for s in sizes)  # decode steps went through the graph path
        if rebalance:
            assert eplb and sum(eplb) > 0
    assert by_rank[0][1] == by_rank[1][1]  # both ranks replayed the same size every step
