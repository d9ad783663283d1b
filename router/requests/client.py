"""A small synchronous gRPC client for `moecluster.v1.Generation` (what `moecluster generate
--url`, `status` and `down` use; also handy in scripts)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from moecluster.proto.v1 import generation_pb2 as pb
from moecluster.proto.v1 import generation_pb2_grpc as pb_grpc


@dataclass
class Completion:
    request_id: str = ""
    texts: dict[int, str] = field(default_factory=dict)  # sample index -> text
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Client:
    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None, tls_ca: Path | None = None) -> None:
        if tls_ca is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(tls_ca.read_bytes()))
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def stream(
        self, prompt: str | None = None, *, token_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None, model: str = "", request_id: str = "", session_id: str = "",
        timeout: float | None = None, **sampling: Any,
    ) -> Iterator[pb.GenerateResponse]:
        """Responses as they stream; exactly one of prompt, token_ids, messages."""
        request = pb.GenerateRequest(model=model, request_id=request_id, session_id=session_id,
                                     sampling=pb.SamplingParams(**sampling))
        if prompt is not None:
            request.text = prompt
        if token_ids is not None:
            request.token_ids.ids.extend(token_ids)
        if messages is not None:
            request.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        out = Completion()
        for r in self.stream(prompt, **kwargs):
            out.request_id = r.request_id
            out.prompt_tokens, out.completion_tokens = r.usage.prompt_tokens, r.usage.completion_tokens
            for c in r.choices:
                out.texts[c.index] = out.texts.get(c.index, "") + c.text
                out.token_ids.setdefault(c.index, []).extend(c.token_ids)
                if c.finish_reason:
                    out.finish_reasons[c.index] = c.finish_reason
        return out

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(pb.AbortRequest(request_id=request_id), metadata=self.metadata).found

    def models(self) -> list[pb.Model]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata).models)

    def status(self, timeout: float | None = 10.0) -> pb.ClusterStatusResponse:
        return self.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
