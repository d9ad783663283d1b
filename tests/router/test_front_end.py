"""The front end over scripted and fake backends: tool calls and reasoning through the openai client,
overload statuses, auth, TLS, and a disconnected HTTP client aborting its request."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")
openai = pytest.importorskip("openai")

from moecluster.cluster.bench.fake_engine import FakeEngine  # noqa: E402
from moecluster.router.requests.backend import ChoiceDelta, Delta, ModelInfo, ReplicaState  # noqa: E402
from moecluster.router.requests.client import Client  # noqa: E402
from moecluster.router.requests.placement import RankView  # noqa: E402
from moecluster.router.requests.server import RouterConfig, RouterServer  # noqa: E402
from moecluster.text.tokenizer import load_tokenizer  # noqa: E402

KIMI_CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
             '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')


class ScriptedBackend:
    """Answers every request with the same text, cut into the given pieces (one token each)."""

    def __init__(self, pieces: list[str], model_type: str = "kimi_k2") -> None:
        self.pieces = pieces
        self.model = ModelInfo("scripted", "(none)", 4096, 16, model_type)
        self.seen: list[dict] = []

    def submit(self, request_id, prompt_ids, sampling, sink, prompt=None, target=None) -> None:  # noqa: ANN001
        self.seen.append({"sampling": sampling, "prompt": prompt})

        def run() -> None:
            for i, piece in enumerate(self.pieces):
                last = i == len(self.pieces) - 1
                sink(Delta(request_id, [ChoiceDelta(0, piece, [i + 3], finish_reason="stop" if last else None)], last))

        threading.Thread(target=run, daemon=True).start()

    def abort(self, request_id: str) -> bool:
        return False

    def rank_views(self) -> list[RankView]:
        return [RankView("decode-0", 0, True, 0, 0, 0.0)]

    def status(self):  # noqa: ANN201
        return [ReplicaState("decode-0", "both", True, 0)], 0, 0


def serve(backend, tokenizer_dir: Path, **config) -> RouterServer:  # noqa: ANN001
    server = RouterServer(backend, load_tokenizer(tokenizer_dir), RouterConfig(grpc_port=0, http_port=0, **config))
    server.start()
    return server


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_tool_calls_and_reasoning_in_openai_form(tiny_checkpoint) -> None:
    pieces = ["<think>", "look it", " up", "</think>", "\n", "Let me check. ", *[KIMI_CALL[i:i + 7] for i in range(0, len(KIMI_CALL), 7)]]
    backend = ScriptedBackend(pieces)
    server = serve(backend, tiny_checkpoint(num_layers=2, arch="kimi-k2"))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="x")
        messages = [{"role": "user", "content": "weather in Paris?"}]
        r = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        assert msg.reasoning_content == "look it up" and msg.content == "Let me check. "
        assert [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls] == [
            ("functions.get_weather:0", "get_weather", '{"city": "Paris"}')]
        assert backend.seen[-1]["sampling"]["skip_special_tokens"] is False  # markers must reach the parser
        content, reasoning, calls, reasons = "", "", [], []
        for ch in client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, stream=True):
            d = ch.choices[0].delta
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            calls += d.tool_calls or []
            reasons.append(ch.choices[0].finish_reason)
        assert (reasoning, content) == ("look it up", "Let me check. ")
        assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [(0, "get_weather", '{"city": "Paris"}')]
        assert reasons[-1] == "tool_calls"
    finally:
        server.stop()


def test_full_queues_answer_resource_exhausted_and_429(tiny_checkpoint) -> None:
    engine = FakeEngine(step_s=0.05)
    server = serve(engine, tiny_checkpoint(num_layers=2), max_queue=2)
    try:
        with Client(f"127.0.0.1:{server.grpc_port}") as client:
            running = [client.stream("hello", max_tokens=40) for _ in range(2)]
            for call in running:
                next(call)  # both admitted and streaming
            with pytest.raises(grpc.RpcError) as err:
                list(client.stream("one more", max_tokens=2))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(err.value.trailing_metadata())["retry-after-ms"] == "1000"
            http = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError) as rl:
                http.completions.create(model="fake", prompt="hi", max_tokens=2)
            assert rl.value.response.headers["Retry-After"] == "1"
            for call in running:
                call.cancel()
    finally:
        server.stop()
        engine.close()


def test_bearer_key_is_required_when_configured(tiny_checkpoint) -> None:
    engine = FakeEngine(step_s=0.001)
    server = serve(engine, tiny_checkpoint(num_layers=2), api_key="s3cret")
    try:
        with Client(f"127.0.0.1:{server.grpc_port}") as anonymous:
            with pytest.raises(grpc.RpcError) as err:
                anonymous.models()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(f"127.0.0.1:{server.grpc_port}", api_key="s3cret") as client:
            assert client.complete("hi", max_tokens=2).finish_reasons == {0: "length"}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="wrong").models.list()
        ok = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="s3cret")
        assert [m.id for m in ok.models.list().data] == ["fake"]
    finally:
        server.stop()
        engine.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls_on_both_protocols(tiny_checkpoint, tmp_path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    engine = FakeEngine(step_s=0.001)
    server = serve(engine, tiny_checkpoint(num_layers=2), tls_cert=cert, tls_key=key)
    try:
        with Client(f"localhost:{server.grpc_port}", tls_ca=cert) as client:
            assert client.complete("hi", max_tokens=2).finish_reasons == {0: "length"}
        import json
        import ssl
        import urllib.request

        req = urllib.request.Request(f"https://localhost:{server.http_port}/v1/completions", method="POST",
                                     data=b'{"prompt": "hi", "max_tokens": 2}', headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(cert))) as r:
            assert json.loads(r.read())["choices"][0]["finish_reason"] == "length"
    finally:
        server.stop()
        engine.close()


def test_http_client_that_disconnects_aborts_its_request(tiny_checkpoint) -> None:
    engine = FakeEngine(step_s=0.01)
    server = serve(engine, tiny_checkpoint(num_layers=2))
    try:
        body = b'{"prompt": "hello", "max_tokens": 1000, "stream": true}'
        with socket.create_connection(("127.0.0.1", server.http_port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert b"200 OK" in s.recv(4096)
            time.sleep(0.1)
        deadline = time.time() + 10
        while time.time() < deadline and (server.service.stats.open or engine._open):
            time.sleep(0.05)
        assert server.service.stats.open == 0 and not engine._open  # aborted in the engine too
        assert server.service.stats.aborted >= 1
    finally:
        server.stop()
        engine.close()


def test_metrics_on_their_own_port(tiny_checkpoint) -> None:
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = FakeEngine(step_s=0.001)
    server = serve(engine, tiny_checkpoint(num_layers=2), metrics_port=port)
    try:
        with Client(f"127.0.0.1:{server.grpc_port}") as client:
            client.complete("hi", max_tokens=2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'moecluster_router_requests_total{outcome="finished",protocol="grpc"} 1.0' in text
    finally:
        server.stop()
        engine.close()


def test_chat_without_max_tokens_runs_to_the_context_limit(tiny_checkpoint) -> None:
    backend = ScriptedBackend(["hello", " there"])
    server = serve(backend, tiny_checkpoint(num_layers=2, arch="kimi-k2"))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="x")
        client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
        assert backend.seen[-1]["sampling"]["max_tokens"] is None  # not the completions default of 16
        client.completions.create(model="scripted", prompt="hi")
        assert "max_tokens" not in backend.seen[-1]["sampling"]  # legacy completions keep 16
    finally:
        server.stop()


def test_streaming_chat_refused_at_admission_gets_its_http_status(tiny_checkpoint) -> None:
    engine = FakeEngine(step_s=0.05)
    server = serve(engine, tiny_checkpoint(num_layers=2), max_queue=1)
    try:
        with Client(f"127.0.0.1:{server.grpc_port}") as client:
            running = client.stream("hello", max_tokens=40)
            next(running)
            http = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):  # 429 before any chunk, not 200 + an error event
                list(http.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2, stream=True))
            running.cancel()
    finally:
        server.stop()
        engine.close()
