"""The decode-graph path on the CPU: the padded static batch that CUDA graphs replay, run eagerly
(`capture=False`), against the ordinary eager step. Same greedy tokens and logits, padding rows
never reach the cache of a real sequence or EPLB's counts, mixed batches fall back to eager."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from moecluster.text.tokenizer import load_tokenizer
from moecluster.workers.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes, graphable
from moecluster.workers.engine.engine_config import EngineConfig, build_core
from moecluster.workers.engine.engine_core import EngineCore
from moecluster.workers.engine.kv_cache import allocate_kv_cache
from moecluster.workers.engine.model_runner import ModelRunner
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.model.moe import MoE

BLOCK = 16
NUM_BLOCKS = 48


def test_batch_sizes() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    sizes = graph_batch_sizes(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256 and 160 in sizes and sizes == sorted(set(sizes))
    assert graph_batch_sizes(100)[-1] == 100
    with pytest.raises(ValueError, match="max_batch"):
        graph_batch_sizes(0)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint(num_layers=3)


def _core(ckpt: Path, graphs: bool, max_batch: int = 8) -> EngineCore:
    """An fp32 CPU engine; with `graphs`, its runner goes through DecodeGraphs (no capture) with
    one scratch block past the managed ones, as build_core sets it up on a GPU."""
    cfg = EngineConfig(model=ckpt, dtype="float32", device="cpu", block_size=BLOCK, num_kv_blocks=NUM_BLOCKS,
                       enable_prefix_caching=False)
    core = build_core(cfg, load_tokenizer(ckpt))
    if graphs:  # the block manager hands out blocks 0..NUM_BLOCKS-1; block NUM_BLOCKS is the scratch
        model = core.runner.model
        kv = allocate_kv_cache(model.cfg, NUM_BLOCKS + 1, BLOCK, torch.float32, "cpu")
        dg = DecodeGraphs(model, kv, BLOCK, max_batch, 512, scratch_block=NUM_BLOCKS, capture=False)
        core.runner = ModelRunner(model, kv, BLOCK, dg)
    return core


def _run(core: EngineCore, prompts: list[list[int]], max_tokens: int, logits_log: list | None = None) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, params)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while core.has_unfinished():
        for o in core.step():
            out[o.request_id] += o.outputs[0].token_ids
    return out


def test_padded_decode_batches_match_eager(ckpt: Path) -> None:
    rng = random.Random(7)
    prompts = [[rng.randrange(2, 900) for _ in range(n)] for n in (5, 23, 9)]  # 3 decodes -> size 4 (1 padding row)
    eager, padded = _core(ckpt, graphs=False), _core(ckpt, graphs=True)
    calls = []
    run = padded.runner.graphs.run

    def counting_run(scheduled, size=None, prev=None):  # noqa: ANN001, ANN202
        calls.append(len(scheduled))
        return run(scheduled, size, prev)

    padded.runner.graphs.run = counting_run
    want, got = _run(eager, prompts, 12), _run(padded, prompts, 12)
    assert got == want
    assert calls and 3 in calls  # the decode steps went through the padded path
    # EPLB's recording: padding rows' choices are not counted
    for a, b in zip(eager.runner.model.modules(), padded.runner.model.modules()):
        if isinstance(a, MoE):
            assert torch.equal(a.expert_counts, b.expert_counts)


def test_padding_writes_only_the_scratch_block(ckpt: Path) -> None:
    core = _core(ckpt, graphs=True)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i in range(3):  # three decodes run at size 4: one padding row
        core.add_request(f"r{i}", list(range(2 + i, 12 + 3 * i)), params)
    while core.has_unfinished():
        before = [c[:NUM_BLOCKS].clone() for c in core.runner.kv_caches]
        sched = core.schedule()
        used = {b for s in sched.scheduled for b in s.seq.table.block_ids}
        core.execute(sched)
        for old, new in zip(before, core.runner.kv_caches):
            changed = {int(b) for b in torch.nonzero((old != new[:NUM_BLOCKS]).flatten(1).any(1)).flatten()}
            assert changed <= used  # a real block changed only if the batch owns it
    assert core.runner.kv_caches[0][NUM_BLOCKS].abs().sum() > 0  # the padding rows wrote their latents here


def test_mixed_batches_run_eagerly(ckpt: Path) -> None:
    core = _core(ckpt, graphs=True)
    graphs = core.runner.graphs
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    core.add_request("a", list(range(2, 30)), params)
    sched = core.schedule()
    assert not graphs.can_run(sched.scheduled)  # a prefill chunk
    core.execute(sched)
    sched = core.schedule()
    assert graphs.can_run(sched.scheduled)  # its first decode
    core.execute(sched)
    many = [s for s in sched.scheduled] * 9  # more sequences than the largest size
    assert not graphs.can_run(many)
    assert not graphs.can_run([])


def test_graphable_and_scratch_checks(ckpt: Path) -> None:
    core = _core(ckpt, graphs=False)
    assert graphable(core.runner.model)
    with pytest.raises(ValueError, match="scratch block"):
        DecodeGraphs(core.runner.model, core.runner.kv_caches, BLOCK, 4, 512, scratch_block=NUM_BLOCKS + 1, capture=False)


def test_fill_rewrites_a_table_row_exactly_when_its_blocks_differ(ckpt: Path) -> None:
    """The host block-table rows the graphs read always hold each row's sequence's blocks: after a
    sequence gains a block, after rows change hands, and after a table is cleared and refilled to
    the same length with other blocks (the row cache compares contents, not identities)."""
    from types import SimpleNamespace

    core = _core(ckpt, graphs=True)
    dg = core.runner.graphs
    assert dg is not None

    def seq(blocks: list[int], pos: int) -> SimpleNamespace:
        table = SimpleNamespace(block_ids=blocks)
        return SimpleNamespace(seq=SimpleNamespace(table=table, num_computed=pos, token_ids=list(range(100))))

    def check(scheduled: list[SimpleNamespace], size: int) -> None:
        dg.fill(scheduled, size)
        tables, host = dg._host_tables.numpy(), dg._host.numpy()
        for i, s in enumerate(scheduled):
            blocks, pos = s.seq.table.block_ids, s.seq.num_computed
            assert tables[i, : len(blocks)].tolist() == blocks
            assert host[:, i].tolist() == [pos, pos, blocks[pos // BLOCK] * BLOCK + pos % BLOCK, pos + 1, 1, -1]
        assert (tables[len(scheduled):size, 0] == NUM_BLOCKS).all() and (host[4, len(scheduled):size] == 0).all()

    a, b, c = seq([3, 4], 20), seq([7], 5), seq([9, 10, 11], 40)
    check([a, b, c], 4)
    a.seq.table.block_ids.append(12)  # a grows in place
    a.seq.num_computed = 32
    check([a, b, c], 4)
    check([c, a], 2)  # rows change hands (b finished)
    c.seq.table.block_ids[:] = [20, 21, 22]  # cleared and refilled, same list and length
    check([c, a], 2)
    check([b, c, a], 4)
    check([a, b], 2)
    check([a], 2)  # row 1 becomes padding (its first table entry now the scratch block)
    check([a, b], 2)  # and takes the same sequence again: its table is written back


@pytest.mark.parametrize(("experts_w8a8", "linears_w8a8"), [(False, False), (True, False), (False, True), (True, True)])
def test_decode_w8a8_options_inside_the_graph_forward(ckpt: Path, experts_w8a8: bool, linears_w8a8: bool) -> None:
    """`decode_experts_w8a8` / `decode_linears_w8a8`: inside the decode graphs' forward (warm-up,
    capture, the eager stand-in), FP8 routed experts with 16-bit activations take W8A8 at decode
    sizes with the first, dense FP8 linears from W8A8_DECODE_LINEAR_MIN_ROWS rows with the second, each
    independently; prefill-sized experts never; outside, the defaults are untouched."""
    from moecluster.kernels.fused_moe import (
        W8A8_DECODE_LINEAR_MIN_ROWS, W8A8_LINEAR_MIN_ROWS, w8a8_default, w8a8_experts_default, w8a8_linear_default)

    core = _core(ckpt, graphs=False)
    kv = allocate_kv_cache(core.runner.model.cfg, NUM_BLOCKS + 1, BLOCK, torch.float32, "cpu")
    dg = DecodeGraphs(core.runner.model, kv, BLOCK, 4, 512, scratch_block=NUM_BLOCKS, capture=False,
                      experts_w8a8=experts_w8a8, linears_w8a8=linears_w8a8)
    bf16 = torch.zeros(1, dtype=torch.bfloat16)
    with dg._graph_forward():
        assert w8a8_experts_default(2.0, bf16) == experts_w8a8 and not w8a8_default(10**6, bf16)
        assert w8a8_linear_default(W8A8_DECODE_LINEAR_MIN_ROWS, bf16) == linears_w8a8
        assert not w8a8_linear_default(W8A8_DECODE_LINEAR_MIN_ROWS - 1, bf16)
        assert not w8a8_experts_default(2.0, torch.zeros(1))  # fp32 activations: never
        assert not w8a8_linear_default(10**6, torch.zeros(1))
    assert not w8a8_experts_default(2.0, bf16) and w8a8_linear_default(W8A8_LINEAR_MIN_ROWS, bf16)
    assert not w8a8_linear_default(W8A8_LINEAR_MIN_ROWS - 1, bf16)  # outside: the prefill threshold again
