"""The config variants of `tests/workers/test_config_variants.py` on CUDA, where the kernels run.

Odd head counts and head dims, no q compression, other rope settings, routing groups, shared
experts 0 or 2, FP8 and INT4 weights: each must take the Triton / Gluon paths (or their
fallbacks) correctly, not only the CPU's torch references.
- fp32: greedy tokens identical to transformers' DeepseekV3ForCausalLM on the CPU, logprobs close.
- bf16, decode steps replayed from CUDA graphs: teacher-forced against the same fp32 reference,
  the chosen tokens' logprobs close to the reference's and the picks near its best, over all steps
  (bf16 rounding can flip near-ties, so exact tokens are not asked; see `_bf16_close`).

Run through the device tool (`python -m pytest -m gpu`); skipped on machines without CUDA.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from moecluster import LLM, SamplingParams
from tests.reference import assert_greedy_matches, load_reference
from tests.workers.test_config_variants import VARIANTS, _variant_checkpoint

NEW_TOKENS = 8
PROMPT_LENGTHS = (5, 21, 70)
QUANTIZED = [("odd-heads-and-dims", "deepseek-v3", "fp8"), ("no-shared-no-dense", "deepseek-v3", "fp8"),
             ("moonlight-like", "kimi-k2", "int4"), ("groups-8-top-3-k2-unnormalised", "kimi-k2", "int4")]
BF16_MARGIN = 0.15  # nats: a bf16 pick may trail the reference's best by this much (a near-tie)
BF16_MEDIAN_TOL = 0.06  # nats: transformers' own bf16 run reads 0.02-0.04 on these models
BF16_NEAR_SHARE = 0.8


def _prompts(ckpt: Path, seed: str) -> list[list[int]]:
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENGTHS]


def _generate(ckpt: Path, prompts: list[list[int]], dtype: str) -> list:
    llm = LLM(model=ckpt, dtype=dtype, device="cuda", block_size=16, num_kv_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    try:
        return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    finally:
        llm.engine.shutdown()


def _fp32_matches(ckpt: Path, tmp: Path, seed: str) -> None:
    prompts = _prompts(ckpt, seed)
    outs = _generate(ckpt, prompts, "float32")
    assert_greedy_matches(load_reference(ckpt, tmp / "ref"), prompts, outs, NEW_TOKENS, 1e-3)


@torch.no_grad()
def _bf16_close(ckpt: Path, tmp: Path, seed: str) -> None:
    """Over every step of every prompt: the median |logprob - reference| of the chosen tokens, and
    the share of steps whose pick is within BF16_MARGIN of the reference's best. Per-step bounds
    would not hold: on these tiny random models bf16 rounding now and then flips a routing choice
    and moves a step by a nat or more, in transformers' own bf16 run as much as in ours. A kernel
    that is wrong (a stride, a head dim, a scale) moves most steps."""
    prompts = _prompts(ckpt, seed)
    outs = _generate(ckpt, prompts, "bfloat16")
    reference = load_reference(ckpt, tmp / "ref")
    devs, near = [], []
    for prompt, got in zip(prompts, outs):
        assert len(got.token_ids) == NEW_TOKENS
        seq = torch.tensor([prompt + got.token_ids[:-1]])
        logits = reference(input_ids=seq).logits[0, len(prompt) - 1 :].float()  # (NEW_TOKENS, vocab)
        ref = torch.log_softmax(logits, dim=-1)
        for i, (step, tok) in enumerate(zip(got.logprobs, got.token_ids)):
            devs.append(abs(step[tok].logprob - float(ref[i, tok])))
            near.append(float(ref[i, tok]) >= float(ref[i].max()) - BF16_MARGIN)
    median = sorted(devs)[len(devs) // 2]
    assert median <= BF16_MEDIAN_TOL, f"median |logprob - reference| {median:.3f} (max {max(devs):.3f})"
    assert sum(near) >= BF16_NEAR_SHARE * len(near), f"{sum(near)} of {len(near)} picks near the reference's best"


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cuda_fp32_variant_matches_transformers(tmp_path: Path, name: str) -> None:
    _fp32_matches(_variant_checkpoint(tmp_path, name), tmp_path, name)


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "arch", "quant"), QUANTIZED)
def test_cuda_fp32_quantized_variant_matches_transformers(tmp_path: Path, name: str, arch: str, quant: str) -> None:
    _fp32_matches(_variant_checkpoint(tmp_path, name, quant, arch), tmp_path, name)


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "arch", "quant"), [(n, "deepseek-v3", "none") for n in VARIANTS] + QUANTIZED)
def test_cuda_bf16_graph_variant_close_to_transformers(tmp_path: Path, name: str, arch: str, quant: str) -> None:
    _bf16_close(_variant_checkpoint(tmp_path, name, quant, arch), tmp_path, name)
