"""A demanding client against the front end (over the benchmark's fake engine): JSON values of the
wrong type, unpaired surrogate escapes and undecodable gRPC messages get clear 4xx /
INVALID_ARGUMENT answers naming the field, never a coerced value, a 500 or UNKNOWN."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

grpc = pytest.importorskip("grpc")

from moecluster.proto.v1 import generation_pb2 as pb  # noqa: E402
from moecluster.router.requests.client import Client  # noqa: E402
from moecluster.router.requests.server import RouterServer  # noqa: E402
from moecluster.router.requests.service import _field_of  # noqa: E402

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def send(router: RouterServer, path: str, data: bytes, method: str = "POST") -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{router.http_port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"max_tokens": "5"}, "max_tokens", "integer"),
    ({"max_tokens": True}, "max_tokens", "integer"),
    ({"n": "2"}, "n", "integer"),
    ({"seed": "7"}, "seed", "integer"),
    ({"seed": 2**64}, "seed", "64-bit"),  # torch's generators take 64 bits: the engine step would fail
    ({"temperature": "0.5"}, "temperature", "number"),
    ({"top_p": False}, "top_p", "number"),
    ({"ignore_eos": "yes"}, "ignore_eos", "true or false"),
    ({"skip_special_tokens": 0}, "skip_special_tokens", "true or false"),
    ({"stop": [5]}, "stop", "strings"),
    ({"stop": {"a": 1}}, "stop", "strings"),
    ({"stop_token_ids": ["1"]}, "stop_token_ids", "integers"),
])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_wrong_json_types_are_refused_by_name(router, path, body, param, says) -> None:
    base = {"prompt": "hello"} if path == COMPLETIONS else {"messages": [{"role": "user", "content": "hello"}]}
    status, payload = send(router, path, json.dumps({**base, "max_tokens": 2, **body}).encode())
    assert status == 400, payload
    error = payload["error"]
    assert error["param"] == param and says in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "top_p": Infinity}'])
def test_non_finite_numbers_are_refused(router, raw) -> None:
    status, payload = send(router, COMPLETIONS, raw)
    assert status == 400 and "finite" in payload["error"]["message"], payload


@pytest.mark.parametrize(("path", "raw", "param"), [
    (COMPLETIONS, b'{"prompt": "a \\ud800 b", "max_tokens": 2}', "prompt"),
    (COMPLETIONS, b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt"),
    (COMPLETIONS, b'{"prompt": "hi", "stop": ["\\udc00"], "max_tokens": 2}', "stop"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 2}', "messages"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "stream": true, "user": "\\ud800"}', "user"),
])
def test_unpaired_surrogate_escapes_are_a_400_not_a_500(router, path, raw, param) -> None:
    status, payload = send(router, path, raw)
    assert status == 400, payload
    assert payload["error"]["param"] == param and "surrogate" in payload["error"]["message"]


def test_paired_surrogate_escapes_still_work(router) -> None:
    status, payload = send(router, COMPLETIONS, b'{"prompt": "smile \\ud83d\\ude00 \\\\ud800", "max_tokens": 3}')
    assert status == 200 and payload["usage"]["completion_tokens"] == 3, payload


def test_client_errors_outside_the_api_are_typed_as_the_clients(router) -> None:
    status, payload = send(router, COMPLETIONS, None, method="GET")
    assert status == 405 and payload["error"]["type"] == "invalid_request_error"
    status, payload = send(router, COMPLETIONS, b'{"prompt": "' + b"a" * (33 << 20) + b'"}')
    assert status == 413 and payload["error"]["type"] == "invalid_request_error"


def test_nested_validation_errors_name_their_field() -> None:
    assert _field_of("stop.0: Input should be a valid string") == "stop"
    assert _field_of("temperature: Input should be greater than or equal to 0") == "temperature"
    assert _field_of("prompt of 600 tokens does not fit") is None


def test_undecodable_grpc_messages_are_invalid_argument(router) -> None:
    good = pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2)).SerializeToString()
    channel = grpc.insecure_channel(f"127.0.0.1:{router.grpc_port}")
    generate = channel.unary_stream("/moecluster.v1.Generation/Generate",
                                    request_serializer=lambda b: b, response_deserializer=pb.GenerateResponse.FromString)
    abort = channel.unary_unary("/moecluster.v1.Generation/Abort",
                                request_serializer=lambda b: b, response_deserializer=pb.AbortResponse.FromString)
    assert list(generate(good, timeout=30))[-1].finished  # the raw path works for a good message
    for data in (good.replace(b"hi", b"\xff\xfe"), good[:-1], b"\x08\x96\x01\xff\xff"):
        with pytest.raises(grpc.RpcError) as err:
            list(generate(data, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "GenerateRequest" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        abort(b"\x0a\x05\xff", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
    with Client(f"127.0.0.1:{router.grpc_port}") as client:  # still serving
        assert client.complete("hello", max_tokens=2).finish_reasons == {0: "length"}
    assert router.service.stats.open == 0


def test_overlong_text_is_measured_off_the_event_loop(router, monkeypatch) -> None:
    """A prompt of megabytes used to be tokenized on the router's loop (the Rust tokenizer holds the
    GIL in `encode`): every stream and health check froze for seconds. It is now counted on a worker
    thread and refused without the loop ever tokenizing it."""
    from moecluster.router.requests.service import LONG_TEXT_CHARS

    tokenizer = router.service.tokenizer
    seen: list[int] = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text, *a, **k: (seen.append(len(text)), encode(text, *a, **k))[1])
    big = "hello world " * 40_000  # 480k characters, far over the 256-token context
    for path, body in [(COMPLETIONS, {"prompt": big}), (COMPLETIONS, {"prompt": ["hi", big]}),
                       (CHAT, {"messages": [{"role": "user", "content": big}]})]:
        status, payload = send(router, path, json.dumps(body).encode())
        assert status == 400 and payload["error"]["param"] == "prompt", payload
        assert "does not fit the context length 256" in payload["error"]["message"]
    assert seen and max(seen) <= LONG_TEXT_CHARS  # the loop only ever encoded short texts
    with Client(f"127.0.0.1:{router.grpc_port}") as client:
        with pytest.raises(grpc.RpcError) as err:
            list(client.stream(big, max_tokens=2))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context length" in err.value.details()
    assert max(seen) <= LONG_TEXT_CHARS
    status, payload = send(router, COMPLETIONS, json.dumps({"prompt": "short " * 20, "max_tokens": 2}).encode())
    assert status == 200, payload
