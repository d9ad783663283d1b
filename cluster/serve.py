"""`moecluster serve`: Ray, the deployment, and the router in one driver process.

Without `--address` an embedded local Ray starts (CPU by default: the laptop / CI case); with one
the driver joins that cluster (e.g. a KubeRay head). The deployment builds every pool's placement
groups and rank actors; the router serves gRPC and OpenAI HTTP over it. A state file records where
the servers listen and this process's id, so `status` and `down` find them; SIGTERM / SIGINT stop
the router (health NOT_SERVING first), then the deployment, then Ray.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moecluster.cluster.autoscale.controller import Autoscaler
from moecluster.cluster.deployment import Deployment
from moecluster.cluster.rank_actor import SWITCH_INTERVAL_S
from moecluster.cluster.replica import NAMESPACE
from moecluster.cluster.serving_backend import DeploymentBackend
from moecluster.cluster.spec import DeploymentSpec, RouterSpec, SpecError
from moecluster.router.requests.server import RouterConfig, RouterServer
from moecluster.text.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

STATE_ENV = "MOECLUSTER_STATE"
API_KEY_ENV = "MOECLUSTER_API_KEY"
RAY_CONNECT_TIMEOUT_ENV = "MOECLUSTER_RAY_CONNECT_TIMEOUT_S"


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
    benchmark's private deployment) leaves the state file of `status` / `down` alone. Everything
    that can be checked before Ray starts is (the checkpoint, the router's ports, a server already
    recorded, the Ray address); a failure after leaves no Ray, actors or servers behind."""
    import ray

    if address is None:
        spec.check_paths()
    if write_state:
        _refuse_a_second_server()
    _check_ports(spec.router)
    r = spec.router
    key = api_key if api_key is not None else os.environ.get(r.api_key_env or API_KEY_ENV) or None
    if r.api_key_env and not key:
        raise SpecError(f"spec field 'router.api_key_env': environment variable {r.api_key_env} is not set")
    tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    owns_ray = not ray.is_initialized()
    if owns_ray and address is not None:
        check_ray_reachable(address)
    deployment: Deployment | None = None
    try:
        if owns_ray and address is None:
            ranks = sum(p.replicas * p.ep for p in spec.pools().values())
            with _signals_after():
                ray.init(num_cpus=max(os.cpu_count() or 1, ranks + 1), include_dashboard=False,
                         namespace=NAMESPACE, log_to_driver=False)
            _check_local_gpus(spec)
        elif owns_ray:
            with _signals_after():
                ray.init(address=address, namespace=NAMESPACE)
        deployment = Deployment(spec)
        router = RouterServer(DeploymentBackend(deployment), tokenizer, RouterConfig(
            host=r.host, grpc_port=r.grpc_port, http_port=r.http_port, metrics_port=r.metrics_port, policy=r.policy,
            max_queue=r.max_queue,
            api_key=key, tls_cert=r.tls_cert, tls_key=r.tls_key))
        deployment.on_rebuilt = router.service.policy.forget
        router.start()
    except BaseException:
        if deployment is not None:
            deployment.shutdown()
        if owns_ray:
            ray.shutdown()
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


@contextlib.contextmanager
def _signals_after() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block ends: interrupted halfway, `ray.init` leaves agent
    processes that `ray.shutdown` does not know of; once it returns, the handler runs and the
    cleanup of `start` stops the whole local cluster."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _: held.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for sig in held[:1]:
        os.kill(os.getpid(), sig)  # now, under the handler that was there before


def _check_ports(router: RouterSpec) -> None:
    """Each fixed router port must be free on the router's host: found now, in a second, rather
    than after Ray and the ranks are up (gRPC binds without SO_REUSEPORT, so a clash is refused,
    never shared)."""
    for field in ("grpc_port", "http_port", "metrics_port"):
        port = getattr(router, field)
        if not port:
            continue
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(router.host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as e:
            raise SpecError(f"spec field 'router.host': {router.host!r} does not resolve ({e.strerror})") from None
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as e:
                why = ("is already in use (another `moecluster serve`? see `moecluster status`; or choose another "
                       "port)" if e.errno == errno.EADDRINUSE else f"cannot be bound: {e.strerror or e}")
                raise SpecError(f"spec field 'router.{field}': port {port} on {router.host} {why}") from None


def check_ray_reachable(address: str, timeout_s: float | None = None) -> None:
    """`ray.init(address=...)` retries an unreachable GCS for about ten minutes; ask for a gRPC
    connection first (the GCS and Ray Client both serve gRPC) and fail in seconds instead."""
    if timeout_s is None:
        timeout_s = float(os.environ.get(RAY_CONNECT_TIMEOUT_ENV) or 15.0)
    target = os.environ.get("RAY_ADDRESS") or address if address == "auto" else address
    if target == "local" or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a local cluster ray.init starts, or a TLS GCS this insecure probe cannot judge
    if target.startswith("ray://"):
        target = target.removeprefix("ray://").split("/", 1)[0]
        target = target if ":" in target else f"{target}:10001"
    else:
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die
        except ImportError:  # Ray moved it: let ray.init judge
            return
        try:
            target = canonicalize_bootstrap_address_or_die(target)
        except (ConnectionError, ValueError) as e:
            raise RuntimeError(f"--address {address}: {e}") from None
    import grpc

    shown = address if target == address else f"{address} ({target})"
    host, _, port = target.rpartition(":")
    try:  # refused or unresolvable: say so at once, with the reason
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except ValueError:
        raise RuntimeError(f"--address {address}: expected HOST:PORT, ray://HOST[:PORT] or auto") from None
    except OSError as e:
        raise RuntimeError(f"cannot reach a Ray cluster at {shown}: "
                           f"{e.strerror or type(e).__name__ if not isinstance(e, TimeoutError) else 'timed out'}") from None
    channel = grpc.insecure_channel(target)  # something listens: is it a gRPC server (Ray's GCS or client server)?
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise RuntimeError(f"no Ray cluster answered at {shown} within {timeout_s:g} s: is the head running and "
                           "reachable? (give the GCS address host:6379, or ray://host:10001 for Ray Client; "
                           f"{RAY_CONNECT_TIMEOUT_ENV} sets the wait)") from None
    finally:
        channel.close()


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
        "pid": os.getpid(), "started": process_started(os.getpid()), "grpc": serving.grpc_target,
        "http": serving.http_url, "ray_address": address, "model": serving.spec.served_name,
    }, indent=2))


def read_state() -> dict:
    path = state_path()
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no running deployment recorded in {path} (start one with `moecluster serve`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the state file {path} is unreadable ({e}); remove it if no server runs") from None
    if not (isinstance(state, dict) and isinstance(state.get("pid"), int) and isinstance(state.get("grpc"), str)):
        raise ValueError(f"the state file {path} is not a moecluster state (no pid and grpc address); "
                         "remove it if no server runs")
    return state


def process_started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), telling it from a later process
    given the same pid; None where /proc cannot say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def recorded_server_running(state: dict) -> bool:
    """Whether the state's server process still runs (not merely some process with its pid)."""
    pid = state["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    started, now = state.get("started"), process_started(pid)
    return started is None or now is None or started == now


def live_state() -> dict:
    """The state of a server that runs; a clear error where none is recorded or it has gone."""
    state = read_state()
    if not recorded_server_running(state):
        raise RuntimeError(f"the server recorded in {state_path()} (pid {state['pid']}) is no longer running; "
                           "`moecluster down` clears the stale record")
    return state


def _refuse_a_second_server() -> None:
    try:
        state = read_state()
    except (FileNotFoundError, ValueError):
        return  # nothing recorded, or an unreadable record this server will replace
    if state["pid"] != os.getpid() and recorded_server_running(state):
        raise RuntimeError(f"a deployment already runs (pid {state['pid']}, gRPC {state['grpc']}, recorded in "
                           f"{state_path()}): stop it with `moecluster down`, or give a second one its own "
                           f"{STATE_ENV} and router ports")


def run_forever(serving: Serving, stop: threading.Event | None = None) -> None:
    """Serve until SIGTERM / SIGINT (or `stop`: set by a signal while `start` ran, it stops at once)."""
    stop = stop if stop is not None else threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving {serving.spec.served_name}: gRPC {serving.grpc_target}, OpenAI HTTP {serving.http_url}/v1",
          flush=True)
    stop.wait()
    log.warning("stopping: router, then the deployment")
    serving.stop()


def load_spec(spec_file: str | None, model: str | None) -> DeploymentSpec:
    """The spec file, or the laptop default: one colocated CPU replica of `model`."""
    if spec_file is not None and model is not None:
        raise SpecError("give --spec FILE or --model DIR, not both (a spec names its model in its 'model' field)")
    if spec_file is not None:
        return DeploymentSpec.from_yaml(spec_file)
    if model is None:
        raise SpecError("give --spec FILE, or --model DIR for one CPU replica of a checkpoint (e.g. from make-tiny)")
    return DeploymentSpec.parse({"model": model, "decode": {"replicas": 1, "ep": 1, "device": "cpu"},
                                 "cache": {"block_size": 16}, "engine": {"dtype": "float32"}})
