"""SamplingParams: vLLM's defaults, validation on construction (field named in the error), frozen."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from moecluster import SamplingParams


def test_defaults_mirror_vllm() -> None:
    p = SamplingParams()
    assert p.n == 1
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == -1
    assert p.min_p == 0.0
    assert p.max_tokens == 16
    assert p.stop == []
    assert p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.seed is None
    assert p.logprobs is None
    assert p.skip_special_tokens is True
    assert p.include_stop_str_in_output is False
    assert p.greedy is False


def test_public_import_is_the_engine_class() -> None:
    from moecluster.workers.engine.sampling_params import SamplingParams as Inner

    assert SamplingParams is Inner


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", -1),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", -0.5),
        ("top_p", 1.0001),
        ("top_p", 2),
        ("top_p", math.nan),
        ("top_k", -2),
        ("top_k", -100),
        ("n", 0),
        ("n", -1),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("logprobs", 21),
        ("logprobs", -1),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [""]),
        ("stop_token_ids", ["x"]),
        ("seed", "abc"),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value)
    assert any(e["loc"] and e["loc"][0] == field for e in err.value.errors())


def test_top_k_error_gives_the_reason() -> None:
    with pytest.raises(ValidationError, match="top_k"):
        SamplingParams(top_k=-5)


def test_empty_stop_string_error_gives_the_reason() -> None:
    with pytest.raises(ValidationError, match="non-empty"):
        SamplingParams(stop=["a", ""])


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValidationError) as err:
        SamplingParams(temprature=0.5)
    assert "temprature" in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.0),
        dict(temperature=2.5),
        dict(top_p=1.0),
        dict(top_p=1e-6),
        dict(top_k=-1),
        dict(top_k=0),
        dict(top_k=1),
        dict(n=1),
        dict(n=128),
        dict(min_p=0.0),
        dict(min_p=1.0),
        dict(max_tokens=1),
        dict(max_tokens=None),
        dict(logprobs=0),
        dict(logprobs=20),
        dict(seed=0),
        dict(seed=2**40),
        dict(stop_token_ids=[0, 5]),
    ],
)
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    p = SamplingParams(**kwargs)
    for k, v in kwargs.items():
        assert getattr(p, k) == v


def test_stop_string_becomes_a_list() -> None:
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=["a", "bc"]).stop == ["a", "bc"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_none_means_no_stops() -> None:
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []


def test_int_temperature_is_a_float() -> None:
    p = SamplingParams(temperature=1)
    assert isinstance(p.temperature, float)


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0).greedy is True
    assert SamplingParams(temperature=0.0).greedy is True
    assert SamplingParams(temperature=1e-3).greedy is False


def test_frozen() -> None:
    p = SamplingParams(temperature=0.5)
    with pytest.raises(ValidationError):
        p.temperature = 0.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        p.max_tokens = 3  # type: ignore[misc]
    assert p.temperature == 0.5


def test_equality_by_value() -> None:
    assert SamplingParams(temperature=0.3, stop="x") == SamplingParams(temperature=0.3, stop=["x"])
    assert SamplingParams(temperature=0.3) != SamplingParams(temperature=0.4)
