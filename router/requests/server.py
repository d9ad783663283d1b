"""The router process's servers: gRPC and OpenAI HTTP on one asyncio loop, over one backend.

`RouterServer.start()` runs the loop on a background thread (the cluster driver's own threads keep
the deployment going) and returns once both listen; ports given as 0 are chosen by the OS and
read back. Bearer-token auth and TLS are off unless configured (the key from an environment
variable, never from the spec itself).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web

from moecluster.router.requests.backend import Backend
from moecluster.router.requests.grpc_server import add_services, mark_serving
from moecluster.router.requests.openai_http import OpenAIServer
from moecluster.router.requests.placement import make_policy
from moecluster.router.requests.service import RequestService
from moecluster.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    grpc_port: int = 50051  # 0: any free port
    http_port: int = 8000
    metrics_port: int = 0  # Prometheus text of the router's registry on its own port (0: only /metrics on http_port)
    policy: str = "cache_aware"
    max_queue: int = 1024
    api_key: str | None = None
    tls_cert: Path | None = None  # PEM; TLS on both servers when given with tls_key
    tls_key: Path | None = None


class RouterServer:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, config: RouterConfig) -> None:
        self.config = config
        self.service = RequestService(backend, tokenizer, make_policy(config.policy), config.max_queue)
        self.grpc_port = config.grpc_port
        self.http_port = config.http_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._metrics_server = None

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls_cert else "http"

    def start(self, timeout: float = 30.0) -> None:
        ready, failed = threading.Event(), []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._serve(ready))
            except BaseException as e:  # noqa: BLE001 - reported to start()'s caller
                failed.append(e)
                ready.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="moecluster-router", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("the router did not start listening in time")
        if failed:
            raise RuntimeError(f"the router could not start: {failed[0]!r}") from failed[0]

    async def _serve(self, ready: threading.Event) -> None:
        cfg = self.config
        self._stopped = asyncio.Event()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        status = add_services(server, self.service, cfg.api_key)
        address = f"{cfg.host}:{cfg.grpc_port}"
        if cfg.tls_cert and cfg.tls_key:
            creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
            self.grpc_port = server.add_secure_port(address, creds)
        else:
            self.grpc_port = server.add_insecure_port(address)
        await server.start()
        await mark_serving(status)
        runner = web.AppRunner(OpenAIServer(self.service, cfg.api_key).app(), handler_cancellation=True,
                               access_log=None)
        await runner.setup()
        ssl_context = None
        if cfg.tls_cert and cfg.tls_key:
            import ssl

            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        site = web.TCPSite(runner, cfg.host, cfg.http_port, ssl_context=ssl_context)
        await site.start()
        self.http_port = runner.addresses[0][1]
        if cfg.metrics_port:
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(cfg.metrics_port, addr=cfg.host, registry=self.service.metrics.registry)
        ready.set()
        try:
            await self._stopped.wait()
        finally:
            await mark_serving(status, False)
            await runner.cleanup()
            await server.stop(grace=5)
            if self._metrics_server is not None:
                self._metrics_server.shutdown()

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(15)
