"""`moecluster serve`: Ray, the deployment, and the router in one driver process.

Without `--address` an embedded local Ray starts (CPU by default: the laptop / CI case); with one
the driver joins that cluster (e.g. a KubeRay head). The deployment builds every pool's placement
groups and rank actors; the router serves gRPC and OpenAI HTTP over it. A state file records where
the servers listen and this process's id, so `status` and `down` find them; SIGTERM / SIGINT stop
the router (health NOT_SERVING first), then the deployment, then Ray.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from moecluster.cluster.autoscale.controller import Autoscaler
from moecluster.cluster.deployment import Deployment
from moecluster.cluster.rank_actor import SWITCH_INTERVAL_S
from moecluster.cluster.replica import NAMESPACE
from moecluster.cluster.serving_backend import DeploymentBackend
from moecluster.cluster.spec import DeploymentSpec, SpecError
from moecluster.router.requests.server import RouterConfig, RouterServer
from moecluster.text.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

STATE_ENV = "MOECLUSTER_STATE"
API_KEY_ENV = "MOECLUSTER_API_KEY"


def state_path() -> Path:
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".moecluster" / "serve.json")


@dataclass
class Serving:
    spec: DeploymentSpec
    deployment: Deployment
    router: RouterServer
    owns_ray: bool
    autoscaler: Autoscaler | None = None
    switch_interval: float | None = None  # the process's GIL switch interval before `start`, restored by `stop`

    @property
    def grpc_target(self) -> str:
        host = self.spec.router.host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.router.grpc_port}"

    @property
    def http_url(self) -> str:
        host = self.spec.router.host
        return f"{self.router.scheme}://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.router.http_port}"

    def stop(self) -> None:
        import ray

        self.router.stop()
        if self.autoscaler is not None:
            self.autoscaler.stop()
        self.deployment.shutdown()
        if self.owns_ray:
            ray.shutdown()
        if self.switch_interval is not None:
            sys.setswitchinterval(self.switch_interval)
        path = state_path()
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass


def start(
    spec: DeploymentSpec, address: str | None = None, api_key: str | None = None, write_state: bool = True,
) -> Serving:
    """Bring a deployment and its router up; returns once both serve. `write_state=False` (a
    benchmark's private deployment) leaves the state file of `status` / `down` alone."""
    import ray

    if address is None:
        spec.check_paths()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        if address is None:
            ranks = sum(p.replicas * p.ep for p in spec.pools().values())
            ray.init(num_cpus=max(os.cpu_count() or 1, ranks + 1), include_dashboard=False, namespace=NAMESPACE,
                     log_to_driver=False)
            try:
                _check_local_gpus(spec)
            except SpecError:
                ray.shutdown()
                raise
        else:
            ray.init(address=address, namespace=NAMESPACE)
    tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    deployment = Deployment(spec)
    try:
        r = spec.router
        key = api_key if api_key is not None else os.environ.get(r.api_key_env or API_KEY_ENV) or None
        if r.api_key_env and not key:
            raise SpecError(f"spec field 'router.api_key_env': environment variable {r.api_key_env} is not set")
        router = RouterServer(DeploymentBackend(deployment), tokenizer, RouterConfig(
            host=r.host, grpc_port=r.grpc_port, http_port=r.http_port, metrics_port=r.metrics_port, policy=r.policy,
            max_queue=r.max_queue,
            api_key=key, tls_cert=r.tls_cert, tls_key=r.tls_key))
        deployment.on_rebuilt = router.service.policy.forget
        router.start()
    except BaseException:
        deployment.shutdown()
        raise
    # One thread per rank polls its outputs and the router's event loop streams them; with Python's
    # 5 ms default a thread that wants the GIL can wait a whole decode step. At 1 ms, 2 x 64
    # streams on two H200s delivered 7% more tokens (docs/performance.md, session 10).
    previous_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    serving = Serving(spec, deployment, router, owns_ray, switch_interval=previous_interval)
    if spec.autoscaling is not None:
        serving.autoscaler = Autoscaler(deployment, spec.autoscaling)
        serving.autoscaler.start()
    if write_state:
        _write_state(serving, address)
    return serving


def _check_local_gpus(spec: DeploymentSpec) -> None:
    """An embedded local Ray cannot grow: a spec that needs more GPUs than it found would wait
    for placement groups forever; say so at once (a cluster given by --address may autoscale)."""
    import ray

    need = sum(p.replicas * p.ep for p in spec.pools().values() if p.device == "cuda")
    have = int(ray.cluster_resources().get("GPU", 0))
    if need > have:
        raise SpecError(f"the spec's cuda pools need {need} GPU(s); this machine's Ray found {have} "
                        "(device: cpu runs the pools on CPUs; --address joins a cluster with GPUs)")


def _write_state(serving: Serving, address: str | None) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "pid": os.getpid(), "grpc": serving.grpc_target, "http": serving.http_url, "ray_address": address,
        "model": serving.spec.served_name,
    }, indent=2))


def read_state() -> dict:
    path = state_path()
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no running deployment recorded in {path} (start one with `moecluster serve`)") from None


def run_forever(serving: Serving) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving {serving.spec.served_name}: gRPC {serving.grpc_target}, OpenAI HTTP {serving.http_url}/v1",
          flush=True)
    stop.wait()
    log.warning("stopping: router, then the deployment")
    serving.stop()


def load_spec(spec_file: str | None, model: str | None) -> DeploymentSpec:
    """The spec file, or the laptop default: one colocated CPU replica of `model`."""
    if spec_file is not None:
        return DeploymentSpec.from_yaml(spec_file)
    if model is None:
        raise SpecError("give --spec FILE, or --model DIR for one CPU replica of a checkpoint (e.g. from make-tiny)")
    return DeploymentSpec.parse({"model": model, "decode": {"replicas": 1, "ep": 1, "device": "cpu"},
                                 "cache": {"block_size": 16}, "engine": {"dtype": "float32"}})
