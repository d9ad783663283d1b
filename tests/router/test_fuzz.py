"""Malformed requests over both protocols: every answer is a clear error or a real completion, the
server never fails (no 5xx, no UNKNOWN / INTERNAL) and stays healthy."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

grpc = pytest.importorskip("grpc")

from moecluster.proto.v1 import generation_pb2 as pb  # noqa: E402
from moecluster.router.requests.client import Client  # noqa: E402
from moecluster.router.requests.server import RouterServer  # noqa: E402

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "n", "stop", "seed", "logprobs", "top_logprobs", "stream", "stream_options", "tools", "tool_choice",
          "frequency_penalty", "presence_penalty", "ignore_eos", "min_p", "stop_token_ids", "user", "echo", "best_of"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=10)
good_messages = st.just([{"role": "user", "content": "hello"}])
bodies = st.dictionaries(st.sampled_from(FIELDS), st.one_of(values, good_messages, st.just("fake"), st.integers(1, 4)),
                         max_size=8)


def post(router: RouterServer, path: str, data: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{router.http_port}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def check_http(status: int, payload: bytes) -> None:
    assert status in (200, 400, 404, 429), (status, payload[:300])
    if status != 200:
        error = json.loads(payload)["error"]
        assert error["message"] and error["type"], error
    elif payload.startswith(b"data:"):
        assert payload.rstrip().endswith(b"data: [DONE]")
    else:
        assert json.loads(payload)["choices"] is not None


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_http_bodies(router, body, path) -> None:
    check_http(*post(router, path, json.dumps(body, allow_nan=True).encode()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_http_raw_bytes(router, raw, path) -> None:
    check_http(*post(router, path, raw))


sampling = st.builds(
    pb.SamplingParams,
    n=st.one_of(st.none(), st.integers(0, 200)), temperature=st.one_of(st.none(), st.floats(-2, 3, width=32)),
    top_p=st.one_of(st.none(), st.floats(-1, 2, width=32)), top_k=st.one_of(st.none(), st.integers(-3, 50)),
    max_tokens=st.one_of(st.none(), st.integers(0, 400)), logprobs=st.one_of(st.none(), st.integers(0, 30)),
    stop=st.lists(st.text(max_size=3), max_size=2), seed=st.one_of(st.none(), st.integers(-5, 2**40)),
)
requests = st.builds(
    pb.GenerateRequest,
    model=st.sampled_from(["", "fake", "other"]), sampling=sampling, request_id=st.text(max_size=5),
    session_id=st.text(max_size=5),
    text=st.one_of(st.none(), st.text(max_size=40), st.just("word " * 300)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests, ids=st.one_of(st.none(), st.lists(st.integers(0, 2**32 - 1), max_size=6)))
def test_grpc_requests(router, request, ids) -> None:
    if ids is not None:
        request.token_ids.ids.extend(ids)
    if not request.request_id:
        request.ClearField("request_id")
    with Client(f"127.0.0.1:{router.grpc_port}") as client:
        try:
            for r in client.stub.Generate(request, timeout=30):
                assert r.request_id
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                grpc.StatusCode.RESOURCE_EXHAUSTED), (e.code(), e.details())
            assert e.details()


def test_still_healthy_afterwards(router) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{router.http_port}/health") as r:
        assert json.loads(r.read())["status"] == "ok"
    with Client(f"127.0.0.1:{router.grpc_port}") as client:
        out = client.complete("hello there", max_tokens=3)
        assert out.finish_reasons == {0: "length"} and len(out.token_ids[0]) == 3
    assert router.service.stats.open == 0


def test_merge_keeps_every_token_in_order() -> None:
    from moecluster.router.requests.backend import ChoiceDelta, Delta
    from moecluster.router.requests.inbox import merge

    a = Delta("r", [ChoiceDelta(0, "a", [1]), ChoiceDelta(1, "x", [9])], False)
    b = Delta("r", [ChoiceDelta(0, "b", [2], finish_reason="length")], False)
    c = Delta("r", [ChoiceDelta(1, "y", [8], finish_reason="stop", stop_reason="y")], True)
    m = merge([a, b, c])
    assert [(x.index, x.text, x.token_ids, x.finish_reason) for x in m.choices] == [
        (0, "ab", [1, 2], "length"), (1, "xy", [9, 8], "stop")]
    assert m.finished and a.choices[0].token_ids == [1]  # inputs untouched
