"""The router over the fast fake engine, on free ports: one per test module (fuzzing and the
client-robustness probes send it bad input over HTTP and gRPC)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def router(tiny_checkpoint):
    pytest.importorskip("grpc")
    from moecluster.cluster.bench.fake_engine import FakeEngine
    from moecluster.router.requests.server import RouterConfig, RouterServer
    from moecluster.text.tokenizer import load_tokenizer

    engine = FakeEngine(vocab_size=500, step_s=0.001, max_model_len=256)
    server = RouterServer(engine, load_tokenizer(tiny_checkpoint(num_layers=2)),
                          RouterConfig(grpc_port=0, http_port=0, policy="cache_aware"))
    server.start()
    yield server
    server.stop()
    engine.close()
