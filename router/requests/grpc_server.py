"""The `moecluster.v1.Generation` gRPC service (grpc.aio), plus the standard health service and
server reflection.

Status codes: INVALID_ARGUMENT (the message names the field), NOT_FOUND (unknown model),
RESOURCE_EXHAUSTED (queues full; trailing metadata `retry-after-ms`), DEADLINE_EXCEEDED,
UNAUTHENTICATED (when a bearer token is configured and the `authorization` metadata lacks it),
UNAVAILABLE (the deployment failed the request). A cancelled call aborts its request. Bytes that
parse as no valid message (bad UTF-8 in a string, a corrupt wire format) are INVALID_ARGUMENT too:
the services are registered with a lenient deserializer instead of the generated one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moecluster.proto.v1 import generation_pb2 as pb
from moecluster.proto.v1 import generation_pb2_grpc as pb_grpc
from moecluster.router.requests.backend import Delta, Overloaded
from moecluster.router.requests.service import DeadlineExceeded, GenerateCall, InvalidRequest, RequestService, UnknownModel

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
OPTIONAL_SAMPLING = ("n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "logprobs", "skip_special_tokens")


def sampling_from_proto(s: pb.SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(s, k) for k in OPTIONAL_SAMPLING if s.HasField(k)}
    if s.stop:
        out["stop"] = list(s.stop)
    if s.stop_token_ids:
        out["stop_token_ids"] = list(s.stop_token_ids)
    if s.ignore_eos:
        out["ignore_eos"] = True
    if s.include_stop_str_in_output:
        out["include_stop_str_in_output"] = True
    return out


def call_from_proto(request: pb.GenerateRequest, timeout_s: float | None) -> GenerateCall:
    call = GenerateCall(model=request.model or None, sampling=sampling_from_proto(request.sampling),
                        request_id=request.request_id or None, session_id=request.session_id or None,
                        timeout_s=timeout_s)
    which = request.WhichOneof("input")
    if which == "text":
        call.prompt = request.text
    elif which == "token_ids":
        call.prompt_ids = list(request.token_ids.ids)
    elif which == "chat":
        call.messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
    return call


def response_from_delta(delta: Delta, prompt_tokens: int, completion_tokens: int) -> pb.GenerateResponse:
    choices = []
    for c in delta.choices:
        logprobs = [
            pb.TokenLogprobs(entries=[pb.TokenLogprob(token_id=e.token_id, logprob=e.logprob, rank=e.rank) for e in entry])
            for entry in c.logprobs or []
        ]
        choices.append(pb.Choice(index=c.index, text=c.text, token_ids=c.token_ids, logprobs=logprobs,
                                 finish_reason=c.finish_reason or "",
                                 stop_reason="" if c.stop_reason is None else str(c.stop_reason)))
    return pb.GenerateResponse(request_id=delta.request_id, choices=choices, finished=delta.finished,
                               usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))


class Malformed:
    """A request whose bytes are no valid message (grpcio would answer UNKNOWN with its own text)."""

    def __init__(self, kind: str, error: str) -> None:
        self.kind, self.error = kind, error


def _lenient(message: Any) -> Any:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError as e:
            return Malformed(message.DESCRIPTOR.full_name, str(e))

    return parse


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, service: RequestService, api_key: str | None = None) -> None:
        self.service, self.api_key = service, api_key

    async def _authorize(self, context: grpc.aio.ServicerContext, request: Any = None) -> None:
        """The bearer token when one is configured, then a request that could not be parsed."""
        if self.api_key is not None:
            given = dict(context.invocation_metadata() or ()).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization' metadata")
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request: not a valid {request.kind} message ({request.error})")

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):  # noqa: N802, ANN201
        await self._authorize(context, request)
        try:
            prepared = await self.service.prepare_async(call_from_proto(request, None))
        except UnknownModel as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _named(e))
        completion = 0
        try:
            async with contextlib.aclosing(self.service.stream_prepared(prepared, context.time_remaining())) as deltas:
                async for delta in deltas:
                    completion += sum(len(c.token_ids) for c in delta.choices)
                    yield response_from_delta(delta, len(prepared.prompt_ids), completion)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _named(e))
        except Overloaded as e:
            context.set_trailing_metadata((("retry-after-ms", str(int(e.retry_after_s * 1000))),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except DeadlineExceeded as e:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except (RuntimeError, ConnectionError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the deployment could not finish the request: {e}")

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:  # noqa: N802
        await self._authorize(context, request)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: is required")
        return pb.AbortResponse(found=self.service.abort(request.request_id))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:  # noqa: N802
        await self._authorize(context, request)
        m = self.service.backend.model
        return pb.ListModelsResponse(models=[pb.Model(id=m.name, root=m.root, max_model_len=m.max_model_len)])

    async def ClusterStatus(self, request: pb.ClusterStatusRequest, context: grpc.aio.ServicerContext) -> pb.ClusterStatusResponse:  # noqa: N802
        await self._authorize(context, request)
        replicas, open_requests, failovers = await asyncio.to_thread(self.service.backend.status)  # Ray calls
        return pb.ClusterStatusResponse(
            model=self.service.model_name, open_requests=open_requests, failovers=failovers,
            replicas=[pb.ReplicaStatus(name=r.name, role=r.role, healthy=r.healthy, open_requests=r.open_requests,
                                       ranks=[pb.RankStatus(**rank) for rank in r.ranks]) for r in replicas],
        )


def _named(e: InvalidRequest) -> str:
    text = str(e)
    return text if e.field is None or text.startswith(f"{e.field}:") else f"{e.field}: {text}"


def add_services(server: grpc.aio.Server, service: RequestService, api_key: str | None = None) -> health.aio.HealthServicer:
    """Register Generation, grpc.health.v1 (SERVING for "" and the service) and reflection."""
    servicer = GenerationServicer(service, api_key)
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Generation"].methods:
        kind = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        request, response = (getattr(pb, t.name) for t in (method.input_type, method.output_type))
        handlers[method.name] = kind(getattr(servicer, method.name), request_deserializer=_lenient(request),
                                     response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
    status = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return status


async def mark_serving(status: health.aio.HealthServicer, serving: bool = True) -> None:
    code = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await status.set(name, code)
