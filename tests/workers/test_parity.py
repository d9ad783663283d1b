"""Our model against transformers' DeepseekV3ForCausalLM on make-tiny checkpoints (fp32).

For both architectures and all three on-disk formats: greedy tokens identical over 32 new tokens
for a batch of prompts of different lengths (crossing cache-block boundaries, and running past
YaRN's original window of 64 positions), logprobs within 1e-4.
"""

from __future__ import annotations

import random

import pytest

from moecluster import LLM, SamplingParams
from tests.reference import assert_greedy_matches, greedy_reference, load_reference

NEW_TOKENS = 32
PROMPT_LENGTHS = (3, 17, 33, 90)  # block size 16: inside one block, across one, across two, past 64


@pytest.mark.parametrize("quant", ["none", "fp8", "int4"])
@pytest.mark.parametrize("arch", ["deepseek-v3", "kimi-k2"])
def test_greedy_matches_transformers(tiny_checkpoint, tmp_path, arch: str, quant: str) -> None:
    ckpt = tiny_checkpoint(arch=arch, quant=quant)
    rng = random.Random(f"{arch}-{quant}")
    llm = LLM(model=ckpt, dtype="float32", device="cpu", block_size=16, num_kv_blocks=64)
    vocab = llm.model.cfg.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENGTHS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)

    assert_greedy_matches(load_reference(ckpt, tmp_path / "ref"), prompts, outputs, NEW_TOKENS, 1e-4)
    for out in outputs:
        got = out.outputs[0]
        assert all(step[tok].rank == 1 for step, tok in zip(got.logprobs, got.token_ids))


def test_without_q_compression(tiny_checkpoint, tmp_path) -> None:
    """q_lora_rank null: a plain q_proj instead of q_a_proj / q_a_layernorm / q_b_proj."""
    ckpt = tiny_checkpoint(arch="deepseek-v3", q_lora_rank=None, num_layers=2)
    llm = LLM(model=ckpt, dtype="float32", device="cpu", block_size=16, num_kv_blocks=32)
    prompts = [[5, 9, 200, 31, 7, 8, 100, 44, 12, 3, 1, 90, 91, 92, 93, 94, 95, 96], [300, 301]]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    reference = load_reference(ckpt, tmp_path / "ref")
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == greedy_reference(reference, prompt, 16)[0]


def test_prefill_chunks_over_context_segments_match_transformers(tiny_checkpoint, tmp_path) -> None:
    """Prompts prefilled 24 tokens a step, each chunk's attention expanding the context 8 tokens at
    a time: the same greedy tokens and logprobs as transformers (the long-context memory bound)."""
    from moecluster.workers.model.mla import MLA

    ckpt = tiny_checkpoint(arch="deepseek-v3", quant="fp8")
    llm = LLM(model=ckpt, dtype="float32", device="cpu", block_size=16, num_kv_blocks=64, max_num_batched_tokens=24)
    layers = [m for m in llm.model.modules() if isinstance(m, MLA)]
    assert layers
    for m in layers:
        m.context_chunk = 8
    rng = random.Random("segments")
    vocab = llm.model.cfg.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (9, 50, 90)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert_greedy_matches(load_reference(ckpt, tmp_path / "ref"), prompts, outputs, 12, 1e-4)
