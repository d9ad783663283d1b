"""Decode steps replayed from CUDA graphs give the tokens the eager steps give (fp32), at batch
sizes that need padding, in every weight format; EPLB's counts ignore the padding rows.

Run through the device tool (`python -m pytest -m gpu`); skipped on machines without CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch

from moecluster.text.tokenizer import load_tokenizer
from moecluster.workers.engine.engine_config import EngineConfig, build_core
from moecluster.workers.engine.engine_core import EngineCore
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.model.moe import MoE


def _generate(core: EngineCore, prompts: list[list[int]]) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):  # different lengths: the decode batch shrinks as requests finish
        core.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=6 + 3 * i, ignore_eos=True))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while core.has_unfinished():
        for o in core.step():
            out[o.request_id] += o.outputs[0].token_ids
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "fp8", "int4"])
def test_graph_decode_equals_eager(tiny_checkpoint, quant: str) -> None:
    ckpt = tiny_checkpoint(arch="kimi-k2" if quant == "int4" else "deepseek-v3", quant=quant)
    rng = random.Random(quant)
    prompts = [[rng.randrange(1000) for _ in range(rng.randrange(2, 70))] for _ in range(11)]
    cores = {}
    for max_batch in (0, 16):
        cfg = EngineConfig(model=ckpt, dtype="float32", device="cuda", block_size=16, num_kv_blocks=128,
                           max_model_len=256, cuda_graph_max_batch=max_batch)
        cores[max_batch] = build_core(cfg, load_tokenizer(ckpt))
    eager, graphed = cores[0], cores[16]
    assert eager.runner.graphs is None
    graphs = graphed.runner.graphs
    assert graphs is not None and sorted(graphs._graphs) == [1, 2, 4, 8, 16]
    assert graphed.runner.kv_caches[0].shape[0] == 129  # the scratch block past the managed 128
    sizes: list[int] = []
    run = graphs.run
    graphs.run = lambda scheduled, size=None, prev=None: (sizes.append(len(scheduled)), run(scheduled, size, prev))[1]  # type: ignore[method-assign]
    assert _generate(graphed, prompts) == _generate(eager, prompts)
    assert 11 in sizes and 1 in sizes  # replayed at 16 with 5 padding rows, and down to one sequence
    for a, b in zip(eager.runner.model.modules(), graphed.runner.model.modules()):
        if isinstance(a, MoE):
            assert torch.equal(a.expert_counts, b.expert_counts)


@pytest.mark.gpu
def test_bf16_fp8_graphs_capture_past_the_w8a8_sizes(tiny_checkpoint) -> None:
    """bf16 activations with FP8 weights, graphs up to 160 sequences: eager steps of 128+ rows run
    the FP8 linears in W8A8, and the graphs' warm-up and capture both in the engine's decode modes
    (by default W8A8 linears from 16 rows and W8A8 routed experts; one set of kernels: none is
    first compiled inside a capture). Capture succeeds and 130 concurrent decodes replay the
    graphs to the end."""
    ckpt = tiny_checkpoint(arch="deepseek-v3", quant="fp8")
    cfg = EngineConfig(model=ckpt, dtype="bfloat16", device="cuda", block_size=16, num_kv_blocks=1024,
                       max_model_len=128, max_num_seqs=160, cuda_graph_max_batch=160)
    core = build_core(cfg, load_tokenizer(ckpt))
    graphs = core.runner.graphs
    assert graphs is not None and graphs.max_batch == 160 and 160 in graphs._graphs
    sizes: list[int] = []
    run = graphs.run
    graphs.run = lambda scheduled, size=None, prev=None: (sizes.append(len(scheduled)), run(scheduled, size, prev))[1]  # type: ignore[method-assign]
    rng = random.Random(7)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    for i in range(130):
        core.add_request(f"r{i}", [rng.randrange(1000) for _ in range(rng.randrange(2, 40))], params)
    got: dict[str, int] = {}
    while core.has_unfinished():
        for o in core.step():
            got[o.request_id] = got.get(o.request_id, 0) + len(o.outputs[0].token_ids)
    assert got == {f"r{i}": 5 for i in range(130)} and 130 in sizes


@pytest.mark.gpu
def test_async_graph_steps_equal_sync(tiny_checkpoint) -> None:
    """Asynchronous scheduling on real graphs: each decode step's input tokens are taken on the GPU
    from the previous step's samples while the host has not read them. Streams that stop on tokens
    (learned a step late), seeded sampling and a preempting cache give what the synchronous engine
    gives (fp32)."""
    ckpt = tiny_checkpoint(arch="deepseek-v3", quant="fp8")
    rng = random.Random(11)
    prompts = [[rng.randrange(1000) for _ in range(rng.randrange(2, 60))] for _ in range(12)]
    params = [SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=list(range(3, 1000, 7))),
              SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)]
    results = []
    for async_scheduling in (False, True):
        cfg = EngineConfig(model=ckpt, dtype="float32", device="cuda", block_size=16, num_kv_blocks=24,
                           max_model_len=256, cuda_graph_max_batch=16, async_scheduling=async_scheduling)
        core = build_core(cfg, load_tokenizer(ckpt))
        for i, p in enumerate(prompts):
            core.add_request(f"r{i}", p, params[i % 3])
        out: dict[str, tuple[list[int], str | None]] = {}
        while core.has_unfinished():
            for o in core.step():
                ids, reason = out.get(o.request_id, ([], None))
                out[o.request_id] = (ids + o.outputs[0].token_ids, o.outputs[0].finish_reason or reason)
        assert core.blocks.stats().num_free_blocks == 24
        results.append((out, core.num_preemptions))
    (want, sync_preempted), (got, async_preempted) = results
    assert got == want and len(got) == 12
    assert any(reason == "stop" for _, reason in got.values()) and sync_preempted > 0 and async_preempted > 0
