"""OpenAI-compatible HTTP (aiohttp): /v1/completions, /v1/chat/completions (SSE streaming,
`reasoning_content`, tool calls), /v1/models, /health, /metrics.

Errors are OpenAI-shaped `{"error": {"message", "type", "param", "code"}}`: 400 invalid (param
names the field), 401 bad key, 404 unknown model or path, 429 overloaded (Retry-After), 504
deadline, 503 the deployment failed. Once a stream has started, an error arrives as a final
`data: {"error": ...}` event before `data: [DONE]`. A client that disconnects cancels its
handler, which aborts the request (the runner is built with handler cancellation on).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from moecluster.router.requests.backend import ChoiceDelta, Delta, Overloaded
from moecluster.router.requests.openai_fields import chat_call, completion_calls
from moecluster.router.requests.reasoning import ReasoningSplitter
from moecluster.router.requests.service import (
    DeadlineExceeded, GenerateCall, InvalidRequest, Prepared, RequestService, UnknownModel,
)
from moecluster.router.requests.tool_calls import tool_parser_for

MAX_BODY_BYTES = 32 << 20
REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"  # seconds; the HTTP form of a gRPC deadline


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error", 504: "timeout_error"}.get(status)
    if kind is None:  # e.g. 405 wrong method, 413 body too large: the client's, not the server's
        kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param), status=status, headers=headers)


def classify(e: BaseException) -> tuple[int, str, str | None, dict[str, str] | None]:
    """(HTTP status, message, param, headers) of an error raised while serving a request."""
    if isinstance(e, InvalidRequest):
        return 400, str(e), e.field, None
    if isinstance(e, UnknownModel):
        return 404, str(e), "model", None
    if isinstance(e, Overloaded):
        return 429, str(e), None, {"Retry-After": str(max(1, round(e.retry_after_s)))}
    if isinstance(e, DeadlineExceeded):
        return 504, str(e), None, None
    return 503, f"the deployment could not finish the request: {e}", None, None


class OpenAIServer:
    def __init__(self, service: RequestService, api_key: str | None = None) -> None:
        self.service, self.metrics, self.api_key = service, service.metrics, api_key
        self.tokenizer = service.tokenizer
        self.reasoning = self.tokenizer.token_to_id("</think>") is not None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.api_key is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return error_response(401, "missing or wrong bearer token in the Authorization header")
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400:
                return error_response(e.status, e.reason or "error")
            raise
        except (InvalidRequest, UnknownModel, Overloaded, DeadlineExceeded, RuntimeError, ConnectionError) as e:
            status, message, param, headers = classify(e)  # a failed deployment: 503, OpenAI-shaped
            return error_response(status, message, param, headers)

    # ---- small endpoints -------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        replicas, _, _ = await asyncio.to_thread(self.service.backend.status)  # Ray calls: off the loop
        healthy = any(r.healthy for r in replicas)
        return web.json_response({"status": "ok" if healthy else "unavailable"}, status=200 if healthy else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def models(self, request: web.Request) -> web.Response:
        m = self.service.backend.model
        return web.json_response({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "moecluster", "root": m.root,
             "max_model_len": m.max_model_len},
        ]})

    # ---- completions -----------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        calls, stream, usage = completion_calls(await _json(request))
        timeout = _timeout(request)
        prepared = [await self.service.prepare_async(_with_timeout(c, timeout)) for c in calls]
        rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.service.model_name
        n = prepared[0].sampling.get("n", 1)
        if stream:
            return await self._sse(request, self._completion_chunks(prepared, timeout, rid, created, model, n, usage))
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        logprobs: dict[int, list[ChoiceDelta]] = {}
        completion_tokens = 0
        async for offset, delta in _merged(self.service, prepared, timeout):
            for c in delta.choices:
                i = offset * n + c.index
                texts.setdefault(i, []).append(c.text)
                completion_tokens += len(c.token_ids)
                if c.logprobs is not None:
                    logprobs.setdefault(i, []).append(c)
                if c.finish_reason:
                    finish[i] = c.finish_reason
        choices = []
        for i in sorted(texts):
            lp = None
            if i in logprobs:
                merged = ChoiceDelta(i, "", [t for c in logprobs[i] for t in c.token_ids],
                                     [e for c in logprobs[i] for e in c.logprobs or []])
                lp = self._completion_logprobs(merged)
            choices.append({"index": i, "text": "".join(texts[i]), "logprobs": lp, "finish_reason": finish.get(i)})
        prompt_tokens = sum(len(p.prompt_ids) for p in prepared)
        return web.json_response({
            "id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        })

    async def _completion_chunks(
        self, prepared: list[Prepared], timeout: float | None, rid: str, created: int, model: str, n: int, usage: bool,
    ) -> AsyncIterator[dict[str, Any]]:
        completion_tokens = 0
        async for offset, delta in _merged(self.service, prepared, timeout):
            choices = []
            for c in delta.choices:
                completion_tokens += len(c.token_ids)
                lp = self._completion_logprobs(c) if c.logprobs is not None else None
                choices.append({"index": offset * n + c.index, "text": c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
            yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if usage:
            prompt_tokens = sum(len(p.prompt_ids) for p in prepared)
            yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                   "usage": _usage(prompt_tokens, completion_tokens)}

    # ---- chat ------------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        call, stream, usage = chat_call(await _json(request))
        timeout = _timeout(request)
        p = await self.service.prepare_async(_with_timeout(call, timeout))
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.service.model_name
        parsers = _ChatParsers(self, p, call)
        if stream:
            return await self._sse(request, self._chat_chunks(p, timeout, rid, created, model, usage, parsers))
        text: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        logprobs: dict[int, list[dict[str, Any]]] = {}
        completion_tokens = 0
        async for delta in self._stream(p, timeout):
            for c in delta.choices:
                text.setdefault(c.index, []).append(c.text)
                completion_tokens += len(c.token_ids)
                if c.logprobs is not None:
                    logprobs.setdefault(c.index, []).extend(self._chat_logprobs(c, p.sampling.get("logprobs") or 0))
                if c.finish_reason:
                    finish[c.index] = c.finish_reason
        choices = []
        for i in sorted(text):
            message, called = parsers.whole("".join(text[i]))
            reason = "tool_calls" if called and finish.get(i) == "stop" else finish.get(i)
            choices.append({"index": i, "message": message, "finish_reason": reason,
                            "logprobs": {"content": logprobs[i]} if i in logprobs else None})
        return web.json_response({
            "id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": _usage(len(p.prompt_ids), completion_tokens),
        })

    async def _chat_chunks(
        self, p: Prepared, timeout: float | None, rid: str, created: int, model: str, usage: bool, parsers: _ChatParsers,
    ) -> AsyncIterator[dict[str, Any]]:
        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **extra}

        n = p.sampling.get("n", 1)
        top_k = p.sampling.get("logprobs") or 0
        completion_tokens = 0
        async with contextlib.aclosing(self._stream(p, timeout)) as deltas:
            # admission and the first delta before any chunk: a refused request still gets its HTTP status
            first = await anext(deltas, None)
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(n)])
            async for delta in _prepend(first, deltas):
                choices = self._chat_choices(delta, parsers, top_k)
                completion_tokens += sum(len(c.token_ids) for c in delta.choices)
                if choices:
                    yield chunk(choices)
        if usage:
            yield chunk([], usage=_usage(len(p.prompt_ids), completion_tokens))

    def _chat_choices(self, delta: Delta, parsers: _ChatParsers, top_k: int) -> list[dict[str, Any]]:
        """The chunk's choices for one delta (samples with nothing to say are left out)."""
        choices = []
        for c in delta.choices:
            parts, called = parsers.feed(c.index, c.text, final=c.finish_reason is not None)
            reason = c.finish_reason
            if reason == "stop" and called:
                reason = "tool_calls"
            entry: dict[str, Any] = {"index": c.index, "delta": parts, "finish_reason": reason}
            if c.logprobs is not None:
                entry["logprobs"] = {"content": self._chat_logprobs(c, top_k)}
            if parts or reason or c.logprobs is not None:
                choices.append(entry)
        return choices

    def _completion_logprobs(self, c: ChoiceDelta) -> dict[str, Any]:
        """The legacy completions form: tokens, their logprobs, and the top-k as {token: logprob}."""
        entries = c.logprobs or []
        names = [self.tokenizer.convert_ids_to_tokens([e.token_id for e in entry]) for entry in entries]
        return {
            "tokens": [n[0] for n in names],
            "token_logprobs": [entry[0].logprob for entry in entries],
            "top_logprobs": [{name: e.logprob for name, e in zip(n, entry)} for n, entry in zip(names, entries)],
            "text_offset": [],
        }

    def _chat_logprobs(self, c: ChoiceDelta, top_k: int) -> list[dict[str, Any]]:
        """OpenAI's chat form: per token its text, logprob, UTF-8 bytes and the top_k most likely
        tokens (by rank, the sampled one among them when it ranks that high)."""
        def item(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        out = []
        for entry in c.logprobs or []:
            chosen = entry[0]
            ranked = sorted({e.token_id: e for e in entry if e.rank >= 1}.values(), key=lambda e: e.rank)[:top_k]
            out.append({**item(chosen.token_id, chosen.logprob), "top_logprobs": [item(e.token_id, e.logprob) for e in ranked]})
        return out

    # ---- plumbing --------------------------------------------------------------------------------
    async def _stream(self, p: Prepared, timeout: float | None) -> AsyncIterator[Delta]:
        async with contextlib.aclosing(self.service.stream_prepared(p, timeout, "http")) as deltas:
            async for delta in deltas:
                yield delta

    async def _sse(self, request: web.Request, chunks: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
        """Stream chunks as server-sent events. The first chunk is awaited before the headers go
        out, so a request refused at admission still gets a plain HTTP error status."""
        async with contextlib.aclosing(chunks) as it:
            first = await anext(it, None)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                if first is not None:
                    await response.write(_event(first))
                async for item in it:
                    await response.write(_event(item))
            except (InvalidRequest, UnknownModel, Overloaded, DeadlineExceeded, RuntimeError) as e:
                status, message, param, _ = classify(e)
                await response.write(_event(error_body(status, message, param)))
            await response.write(b"data: [DONE]\n\n")
            return response


class _ChatParsers:
    """Per-sample reasoning split and tool-call parsing of a chat request's output."""

    def __init__(self, server: OpenAIServer, p: Prepared, call: GenerateCall) -> None:
        starts_in = bool(p.prompt) and p.prompt.rstrip().endswith("<think>")
        self.reasoning = server.reasoning
        self.starts_in_reasoning = starts_in
        self.tools = None
        if call.tools:
            try:
                self.tools = tool_parser_for(server.service.backend.model.model_type)
            except ValueError as e:
                raise InvalidRequest(f"tools: {e}", "tools") from None
        self._split: dict[int, ReasoningSplitter] = {}
        self._calls: dict[int, Any] = {}
        self._called: dict[int, int] = {}

    def whole(self, text: str) -> tuple[dict[str, Any], bool]:
        splitter = ReasoningSplitter(starts_in_reasoning=self.starts_in_reasoning) if self.reasoning else None
        reasoning, content = "", text
        if splitter is not None:
            r1, c1 = splitter.feed(text)
            r2, c2 = splitter.flush()
            reasoning, content = r1 + r2, c1 + c2
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning:
            message["reasoning_content"] = reasoning
        calls = []
        if self.tools is not None:
            content, calls = self.tools.parse(content)
            message["content"] = content or None
            if calls:
                message["tool_calls"] = [c.to_openai() for c in calls]
        return message, bool(calls)

    def feed(self, index: int, text: str, final: bool) -> tuple[dict[str, Any], bool]:
        """The delta object for this piece of sample `index`, and whether it has called a tool."""
        reasoning, content = "", text
        if self.reasoning:
            splitter = self._split.setdefault(index, ReasoningSplitter(starts_in_reasoning=self.starts_in_reasoning))
            reasoning, content = splitter.feed(text)
            if final:
                r, c = splitter.flush()
                reasoning, content = reasoning + r, content + c
        parts: dict[str, Any] = {}
        if reasoning:
            parts["reasoning_content"] = reasoning
        if self.tools is not None:
            stream = self._calls.setdefault(index, self.tools.stream())
            events = [stream.feed(content)] + ([stream.finish()] if final else [])
            content = "".join(e.content for e in events)
            deltas = [d for e in events for d in e.tool_call_deltas()]
            if deltas:
                parts["tool_calls"] = deltas
                self._called[index] = self._called.get(index, 0) + len(deltas)
        if content:
            parts["content"] = content
        return parts, self._called.get(index, 0) > 0


async def _prepend(first: Delta | None, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


async def _merged(service: RequestService, prepared: list[Prepared], timeout: float | None) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of several prompts of one request as they come, tagged with the prompt's position."""
    if len(prepared) == 1:
        async with contextlib.aclosing(service.stream_prepared(prepared[0], timeout, "http")) as it:
            async for delta in it:
                yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(offset: int, p: Prepared) -> None:
        try:
            async with contextlib.aclosing(service.stream_prepared(p, timeout, "http")) as it:
                async for delta in it:
                    await queue.put((offset, delta))
            await queue.put((offset, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((offset, e))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prepared)]
    try:
        done = 0
        while done < len(tasks):
            offset, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield offset, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


async def _json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}", "body") from None
    # JSON's \uXXXX escapes can spell half of a UTF-16 surrogate pair alone, which is no Unicode
    # text: the tokenizer (and any UTF-8 encoding of the reply) would fail on it.
    if _SURROGATE_ESCAPE.search(raw) and (where := _lone_surrogate(body, "")) is not None:
        param = re.split(r"[.\[]", where, maxsplit=1)[0] or "body"
        raise InvalidRequest(f"{where or 'body'}: contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), "
                             "which is not valid Unicode text", param)
    return body


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (key or value) that does not encode as UTF-8, if any."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if _lone_surrogate(key, path) is not None:
                return path  # a key: named by the object that holds it (the key itself is no text)
            where = f"{path}.{key}" if path else str(key)
            if (found := _lone_surrogate(item, where)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _lone_surrogate(item, f"{path}[{i}]")) is not None:
                return found
    return None


def _timeout(request: web.Request) -> float | None:
    raw = request.headers.get(REQUEST_TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{REQUEST_TIMEOUT_HEADER}: must be seconds, got {raw!r}", REQUEST_TIMEOUT_HEADER) from None
    if not value > 0:
        raise InvalidRequest(f"{REQUEST_TIMEOUT_HEADER}: must be positive, got {raw!r}", REQUEST_TIMEOUT_HEADER)
    return value


def _with_timeout(call: GenerateCall, timeout: float | None) -> GenerateCall:
    call.timeout_s = timeout
    return call


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
