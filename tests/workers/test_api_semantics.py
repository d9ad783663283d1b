"""The offline API as a vLLM user drives it: values that must be refused up front (not fail inside
an engine step, not be silently ignored) and settings at the edge of their range.

One small LLM per module on a two-layer make-tiny checkpoint (fp32, CPU).
"""

from __future__ import annotations

import pytest
import torch

from moecluster import LLM, SamplingParams
from moecluster.workers.engine.request_limits import RequestError
from moecluster.workers.engine.sampler import SamplingBatch, sample

PROMPT = [5, 77, 301, 12, 900, 44, 3]


def greedy(max_tokens: int = 4, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(model=tiny_checkpoint(num_layers=2), dtype="float32", device="cpu", block_size=16, num_kv_blocks=16)


@pytest.fixture(scope="module")
def reference(llm: LLM) -> list[int]:
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, greedy())
    return out.outputs[0].token_ids


def assert_still_works(llm: LLM, reference: list[int]) -> None:
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, greedy())
    assert out.outputs[0].token_ids == reference


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed, n", [(2**64, 1), (2**70, 1), (-(2**63) - 1, 1), (2**64 - 1, 2)])
def test_seed_the_generator_cannot_take_is_refused_up_front(llm: LLM, reference: list[int], seed: int, n: int) -> None:
    """Each sample seeds a torch generator with seed + its index; a value torch refuses used to
    raise inside the engine thread's step, killing the engine for every later request."""
    with pytest.raises(RequestError, match="seed"):
        llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(seed=seed, n=n, max_tokens=2))
    assert_still_works(llm, reference)


@pytest.mark.parametrize("seed", [-(2**63), 2**63 - 1, 2**64 - 1])
def test_extreme_seeds_that_fit_run_and_reproduce(llm: LLM, seed: int) -> None:
    params = SamplingParams(seed=seed, max_tokens=3, ignore_eos=True)
    a, b = (llm.generate({"prompt_token_ids": PROMPT}, params)[0].outputs[0].token_ids for _ in range(2))
    assert a == b and len(a) == 3


# ---------------------------------------------------------------- vanishing temperature


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-38, 1e-45])
def test_vanishing_temperature_is_greedy_in_the_sampler(temperature: float) -> None:
    """Dividing logits by 1e-38 overflows them to inf: the NaN softmax drew token 0 every time."""
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 5
    for top_k, top_p, min_p in [(-1, 1.0, 0.0), (5, 0.9, 0.1)]:
        batch = SamplingBatch.build([temperature] * 6, [top_k] * 6, [top_p] * 6, [min_p] * 6, [None] * 6, 0, 40, "cpu")
        assert batch.all_greedy
        assert torch.equal(sample(logits, batch).token_ids, logits.argmax(-1))
    # mixed with a sampling row, the vanishing row still takes its argmax
    batch = SamplingBatch.build([temperature, 1.0], [-1, -1], [1.0, 1.0], [0.0, 0.0], [None, None], 0, 40, "cpu")
    assert not batch.all_greedy
    assert sample(logits[:2], batch).token_ids[0] == logits[0].argmax()


def test_vanishing_temperature_is_greedy_through_the_api(llm: LLM, reference: list[int]) -> None:
    params = SamplingParams(temperature=1e-38, max_tokens=4, ignore_eos=True)
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, params)
    assert out.outputs[0].token_ids == reference


# ---------------------------------------------------------------- generate's arguments


def test_empty_sampling_params_list_is_a_length_mismatch(llm: LLM, reference: list[int]) -> None:
    """[] is a list of 0 params for 1 prompt, not "use the defaults" (that is None)."""
    with pytest.raises(ValueError, match="got 0 sampling params for 1 prompts"):
        llm.generate([{"prompt_token_ids": PROMPT}], [])
    assert llm.generate([], []) == []
    assert len(llm.generate([{"prompt_token_ids": PROMPT}], None)[0].outputs[0].token_ids) == 16  # the default
    assert_still_works(llm, reference)


@pytest.mark.parametrize(
    "params",
    [{"temperature": 0.0}, "x", 0.5, [None], [greedy(), {"temperature": 0.0}]],
    ids=["dict", "str", "float", "list-of-none", "list-with-dict"],
)
def test_sampling_params_of_the_wrong_type_are_refused_by_name(llm: LLM, reference: list[int], params: object) -> None:
    prompts = [{"prompt_token_ids": PROMPT}] * (len(params) if isinstance(params, list) else 1)
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams"):
        llm.generate(prompts, params)  # type: ignore[arg-type]
    assert_still_works(llm, reference)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ({"prompt_token_ids": PROMPT, "multi_modal_data": {"image": None}}, "multi_modal_data"),
        ({"prompt_token_ids": PROMPT, "cache_salt": "x"}, "cache_salt"),
        ({"prompt_token_ids": PROMPT, "prompt": 5}, "string"),
    ],
    ids=["multi-modal", "cache-salt", "non-string-text"],
)
def test_dict_prompt_keys_we_would_ignore_are_refused(llm: LLM, reference: list[int], prompt: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], greedy())
    (out,) = llm.generate({"prompt_token_ids": PROMPT, "prompt": "its text"}, greedy())
    assert out.prompt == "its text" and out.outputs[0].token_ids == reference
