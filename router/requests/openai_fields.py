"""OpenAI request bodies -> the service's `GenerateCall`: field checks that name the field.

Only what the engine implements is accepted; a field we do not implement, set to anything but its
neutral value (e.g. `frequency_penalty: 0.5`), is refused by name instead of silently ignored.
Fields with no effect on generation (`user`, `metadata`, `stream_options`, ...) pass.
"""

from __future__ import annotations

import math
from typing import Any

from moecluster.router.requests.service import GenerateCall, InvalidRequest

# OpenAI / vLLM name -> engine sampling field, for fields that map one to one.
SAMPLING_FIELDS = {
    "n": "n", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "stop": "stop", "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos", "seed": "seed",
    "skip_special_tokens": "skip_special_tokens", "include_stop_str_in_output": "include_stop_str_in_output",
}
# Implemented nowhere in the engine: accepted only at their neutral value.
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": None,
           "echo": False, "suffix": None, "response_format": None, "best_of": None}


# JSON types of the sampling fields, checked here: the engine's validation would coerce
# ("5" -> 5, true -> 1, "yes" -> true), so a client's type mistake would pass silently.
INT_FIELDS = ("n", "top_k", "seed", "max_tokens", "max_completion_tokens")
NUMBER_FIELDS = ("temperature", "top_p", "min_p")
BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


def _show(value: Any, limit: int = 80) -> str:
    """A value for an error message, cut short (a body may be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _types(body: dict[str, Any]) -> None:
    for key in INT_FIELDS:
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or (isinstance(value, float) and not value.is_integer())):
            raise InvalidRequest(f"{key}: must be an integer, got {_show(value)}", key)
    seed = body.get("seed")
    if isinstance(seed, (int, float)) and not isinstance(seed, bool) and not -(2**63) <= seed < 2**63:
        raise InvalidRequest(f"seed: must be a 64-bit signed integer, got {_show(seed)}", "seed")  # as the gRPC API's int64
    for key in NUMBER_FIELDS:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequest(f"{key}: must be a number, got {_show(value)}", key)
        if not math.isfinite(value):
            raise InvalidRequest(f"{key}: must be a finite number, got {_show(value)}", key)
    for key in BOOL_FIELDS:
        value = body.get(key)
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest(f"{key}: must be true or false, got {_show(value)}", key)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
        isinstance(stop, list) and all(isinstance(s, str) for s in stop)
    ):
        raise InvalidRequest(f"stop: must be a string or a list of strings, got {_show(stop)}", "stop")
    ids = body.get("stop_token_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        raise InvalidRequest(f"stop_token_ids: must be a list of integers, got {_show(ids)}", "stop_token_ids")


def _neutral(body: dict[str, Any]) -> None:
    for key, neutral in NEUTRAL.items():
        value = body.get(key)
        if value is None or value == neutral or value == {} or (key == "response_format" and value == {"type": "text"}):
            continue
        if key == "best_of" and value == body.get("n", 1):
            continue
        raise InvalidRequest(f"{key}: is not supported by this server (got {_show(value)})", key)


def _sampling(body: dict[str, Any], max_tokens_key: str | tuple[str, ...] = "max_tokens") -> dict[str, Any]:
    _neutral(body)
    _types(body)
    out = {dst: body[src] for src, dst in SAMPLING_FIELDS.items() if body.get(src) is not None}
    keys = (max_tokens_key,) if isinstance(max_tokens_key, str) else max_tokens_key
    for key in keys:
        if body.get(key) is not None:
            out["max_tokens"] = body[key]
            break
    return out


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {type(body).__name__}", "body")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model: must be a string", "model")
    return body


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key}: must be true or false, got {_show(value)}", key)
    return value


def completion_calls(body: Any) -> tuple[list[GenerateCall], bool, bool]:
    """One call per prompt of a /v1/completions body; (calls, stream, include_usage)."""
    body = _object(body)
    sampling = _sampling(body)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int):
            raise InvalidRequest(f"logprobs: must be an integer 0..20, got {_show(logprobs)}", "logprobs")
        sampling["logprobs"] = logprobs
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise InvalidRequest("prompt: must be a non-empty string, a list of token ids, or a list of those", "prompt")
    if len(prompts) > 64:
        raise InvalidRequest(f"prompt: at most 64 prompts per request, got {len(prompts)}", "prompt")
    calls = []
    for i, p in enumerate(prompts):
        call = GenerateCall(model=body.get("model"), sampling=dict(sampling), session_id=_session(body))
        if isinstance(p, str):
            call.prompt = p
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            call.prompt_ids = list(p)
        else:
            raise InvalidRequest(f"prompt[{i}]: must be a non-empty string or a list of token ids", "prompt")
        calls.append(call)
    return calls, _bool(body, "stream"), _include_usage(body)


def chat_call(body: Any) -> tuple[GenerateCall, bool, bool]:
    """The call of a /v1/chat/completions body; (call, stream, include_usage)."""
    body = _object(body)
    sampling = _sampling(body, ("max_completion_tokens", "max_tokens"))
    sampling.setdefault("max_tokens", None)  # chat, as OpenAI: without a limit, up to the context length
    if _bool(body, "logprobs"):
        top = body.get("top_logprobs") or 0
        if isinstance(top, bool) or not isinstance(top, int):
            raise InvalidRequest(f"top_logprobs: must be an integer 0..20, got {_show(top)}", "top_logprobs")
        sampling["logprobs"] = top
    elif body.get("top_logprobs"):
        raise InvalidRequest("top_logprobs: needs logprobs: true", "top_logprobs")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: must be a non-empty list of {role, content} objects", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}]: must be an object with a string 'role'", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"messages[{i}].content[{j}]: only text parts are supported", f"messages[{i}].content")
                texts.append(part["text"])
            m = {**m, "content": "".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content: must be a string or a list of text parts", f"messages[{i}].content")
        clean.append(m)
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function"
                                                  and isinstance(t.get("function"), dict)
                                                  and isinstance(t["function"].get("name"), str) for t in tools):
            raise InvalidRequest("tools: must be a list of {type: function, function: {name, ...}} objects", "tools")
        if body.get("tool_choice") not in (None, "auto", "none"):
            raise InvalidRequest(f"tool_choice: only 'auto' and 'none' are supported, got {_show(body['tool_choice'])}", "tool_choice")
        if body.get("tool_choice") == "none":
            tools = None
        elif tools:
            sampling.setdefault("skip_special_tokens", False)  # tool-call markers must reach the parser
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise InvalidRequest("chat_template_kwargs: must be an object", "chat_template_kwargs")
    call = GenerateCall(model=body.get("model"), messages=clean, tools=tools or None, template_kwargs=kwargs,
                        sampling=sampling, session_id=_session(body))
    return call, _bool(body, "stream"), _include_usage(body)


def _session(body: dict[str, Any]) -> str | None:
    """Agent sessions: vLLM-style `session_id`, else OpenAI's `user` as the affinity key."""
    for key in ("session_id", "user"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("stream_options: must be an object", "stream_options")
    return bool(options.get("include_usage"))
