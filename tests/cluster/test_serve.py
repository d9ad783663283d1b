"""`moecluster serve` end to end on a local CPU Ray cluster: real grpcio and openai clients."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")
openai = pytest.importorskip("openai")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

from moecluster import LLM, SamplingParams  # noqa: E402
from moecluster.cluster.cli import main  # noqa: E402
from moecluster.cluster.serve import start  # noqa: E402
from moecluster.cluster.spec import DeploymentSpec  # noqa: E402
from moecluster.router.requests.client import Client  # noqa: E402

ENGINE = dict(dtype="float32", block_size=16, num_kv_blocks=128)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def served(local_ray, tiny_checkpoint, tmp_path_factory):
    ckpt = tiny_checkpoint(num_layers=2)
    spec = DeploymentSpec.parse({
        "model": str(ckpt), "served_name": "tiny",
        "decode": {"replicas": 2, "ep": 1, "device": "cpu"},
        "cache": {"block_size": 16, "num_blocks": 128},
        "engine": {"dtype": "float32", "max_model_len": 512},
        "router": {"grpc_port": 0, "http_port": 0, "metrics_port": 0, "policy": "cache_aware"},
    })
    mp = pytest.MonkeyPatch()
    mp.setenv("MOECLUSTER_STATE", str(tmp_path_factory.mktemp("state") / "serve.json"))
    serving = start(spec)
    yield serving, ckpt
    serving.stop()
    mp.undo()


@pytest.fixture(scope="module")
def offline(served):
    _, ckpt = served
    return LLM(ckpt, device="cpu", max_model_len=512, **ENGINE)


def expected(offline, prompt: str | list[int], max_tokens: int, chat: bool = False) -> list[int]:
    if chat:
        ids = offline.get_tokenizer().apply_chat_template([{"role": "user", "content": prompt}])
        item = {"prompt_token_ids": ids}
    else:
        item = {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return offline.generate([item], params)[0].outputs[0].token_ids


def test_grpc_health_reflection_and_models(served) -> None:
    serving, _ = served
    channel = grpc.insecure_channel(serving.grpc_target)
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "moecluster.v1.Generation"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "moecluster.v1.Generation" in {s.name for s in answer.list_services_response.service}
    with Client(serving.grpc_target) as client:
        assert [m.id for m in client.models()] == ["tiny"]
        assert client.models()[0].max_model_len == 512


def test_grpc_streams_the_single_process_tokens(served, offline) -> None:
    serving, _ = served
    with Client(serving.grpc_target) as client:
        responses = list(client.stream(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True))
        tokens = [t for r in responses for c in r.choices for t in c.token_ids]
        assert tokens == expected(offline, PROMPT, 12)
        assert responses[-1].finished and responses[-1].choices[-1].finish_reason == "length"
        assert responses[-1].usage.completion_tokens == 12
        ids = offline.get_tokenizer().encode("Hello world, hello")
        got = client.complete(token_ids=ids, max_tokens=6, temperature=0.0, ignore_eos=True)
        assert got.token_ids[0] == expected(offline, ids, 6) and got.prompt_tokens == len(ids)
        chat = client.complete(messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0.0,
                               ignore_eos=True)
        assert chat.token_ids[0] == expected(offline, "hi", 5, chat=True)


@pytest.mark.parametrize(("kwargs", "code", "names"), [
    ({"prompt": "x", "temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ({"prompt": "word " * 600}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"token_ids": [10**6]}, grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"prompt": "x", "model": "gpt-5"}, grpc.StatusCode.NOT_FOUND, "gpt-5"),
])
def test_grpc_bad_requests_get_clear_statuses(served, kwargs, code, names) -> None:
    serving, _ = served
    prompt = kwargs.pop("prompt", None)
    with Client(serving.grpc_target) as client:
        with pytest.raises(grpc.RpcError) as err:
            list(client.stream(prompt, **kwargs))
        assert err.value.code() == code
        assert names in err.value.details()
        assert client.models()  # still serving


def test_cancel_and_deadline_abort_and_free_blocks(served) -> None:
    serving, _ = served
    with Client(serving.grpc_target) as client:
        call = client.stream(PROMPT, max_tokens=400, temperature=0.0, ignore_eos=True, request_id="cancel-me")
        next(call)
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(client.stream(PROMPT, max_tokens=400, temperature=0.0, ignore_eos=True, timeout=0.5))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        end = time.time() + 30
        while time.time() < end:
            status = client.status()
            ranks = [k for r in status.replicas for k in r.ranks]
            if status.open_requests == 0 and all(k.free_blocks == k.total_blocks for k in ranks):
                break
            time.sleep(0.2)
        assert status.open_requests == 0
        assert all(k.free_blocks == k.total_blocks for k in ranks)


def test_openai_client_completions_and_chat(served, offline) -> None:
    serving, _ = served
    client = openai.OpenAI(base_url=f"{serving.http_url}/v1", api_key="unused")
    tok = offline.get_tokenizer()
    want = tok.decode(expected(offline, PROMPT, 10))
    extra = {"ignore_eos": True}
    c = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0.0, extra_body=extra)
    assert c.choices[0].text == want and c.usage.completion_tokens == 10 and c.choices[0].finish_reason == "length"
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0.0, stream=True,
                                       extra_body=extra)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == want
    chat_want = tok.decode(expected(offline, "hi", 8, chat=True))
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       temperature=0.0, extra_body=extra)
    msg = r.choices[0].message
    if "</think>" not in chat_want:  # the toy template opens <think> (R1 style): the output is reasoning
        assert msg.reasoning_content == chat_want and not msg.content
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8, temperature=0.0, stream=True, extra_body=extra,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    streamed = "".join((getattr(ch.choices[0].delta, "reasoning_content", None) or "") + (ch.choices[0].delta.content or "")
                       for ch in chunks if ch.choices)
    assert streamed == (getattr(msg, "reasoning_content", None) or "") + (msg.content or "")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=-2)
    assert "temperature" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=5)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, frequency_penalty=0.5)
    assert "frequency_penalty" in str(err.value)


def test_64_concurrent_openai_streams(served, offline) -> None:
    serving, _ = served
    tok = offline.get_tokenizer()
    prompts = [f"Request number {i} asks about topic {i % 7}" for i in range(64)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = [tok.decode(o.outputs[0].token_ids) for o in offline.generate(prompts, params)]

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{serving.http_url}/v1", api_key="unused", max_retries=0)

        async def one(p: str) -> str:
            stream = await client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0.0,
                                                     stream=True, extra_body={"ignore_eos": True})
            return "".join([ch.choices[0].text async for ch in stream if ch.choices])

        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run()) == want


def test_http_errors_metrics_and_status_cli(served, capsys) -> None:
    serving, _ = served
    req = urllib.request.Request(f"{serving.http_url}/v1/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 400
    body = json.loads(err.value.read())
    assert body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
    metrics = urllib.request.urlopen(f"{serving.http_url}/metrics").read().decode()
    assert "moecluster_router_requests_total" in metrics
    assert json.loads(urllib.request.urlopen(f"{serving.http_url}/health").read())["status"] == "ok"
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "decode-0" in out and "decode-1" in out and "rank 0" in out
    assert main(["generate", "--url", "auto", "--prompt", PROMPT, "--max-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["finish_reason"] in ("length", "stop")


def test_session_turns_stay_where_their_prefix_is(served, caplog) -> None:
    """Cache-aware placement: every turn of a growing multi-turn session goes to the replica that
    holds its prefix (2 replicas; round-robin would alternate)."""
    serving, _ = served
    caplog.set_level(logging.INFO, logger="moecluster.requests")
    history, ids = "You are a careful agent. " * 6, []
    with Client(serving.grpc_target) as client:
        for turn in range(6):
            out = client.complete(history, max_tokens=6, temperature=0.0, session_id="agent-1")
            ids.append(out.request_id)
            history += out.texts[0] + f" tool result {turn}. "
    placed = {}
    for r in caplog.records:
        if r.name == "moecluster.requests":
            event = json.loads(r.getMessage())
            if event["event"] == "placed" and event["request_id"] in ids:
                placed[event["request_id"]] = event["replica"]
    assert len(placed) == len(ids) and len(set(placed.values())) == 1, placed
