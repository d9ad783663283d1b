"""The `moecluster` command line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PLANNED: dict[str, str] = {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moecluster", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_tiny(sub)
    _add_make_slice(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_plan(sub)
    _add_serve(sub)
    _add_autoscale(sub)
    for name, what in PLANNED.items():
        sub.add_parser(name, help=f"not implemented yet: needs {what}").set_defaults(func=_planned(name, what))
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in PLANNED:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"moecluster {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        import grpc

        if isinstance(e, grpc.RpcError):  # a call to a running router failed
            print(f"moecluster {args.command}: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
        known = _user_error(e)
        if known is not None:
            print(f"moecluster {args.command}: error: {known}", file=sys.stderr)
            return 2
        if args.verbose:
            raise
        print(f"moecluster {args.command}: internal error: {type(e).__name__}: {_one_line(str(e))} "
              "(rerun with -v for the traceback)", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _user_error(e: BaseException) -> str | None:
    """One line for a failure the user can act on (bad input, a file, a port, a rank that could
    not start); None for anything else (a bug: shown with its type, and its traceback under -v)."""
    ray = sys.modules.get("ray")
    if ray is not None:
        from ray import exceptions as rx

        if isinstance(e, rx.RayTaskError):  # raised in an actor: the remote cause, not Ray's wrapper and traceback
            cause = e.cause if isinstance(e.cause, BaseException) else None
            inner = _user_error(cause) if cause is not None else None
            what = inner or (f"{type(cause).__name__}: {_one_line(str(cause))}" if cause is not None else "failed")
            return f"{e.function_name} failed: {what}" if getattr(e, "function_name", None) else what
        if isinstance(e, rx.RayError):  # an actor died, a timeout: Ray's first line says which
            lines = [line for line in str(e).splitlines() if line.strip()]
            return f"{type(e).__name__}: {lines[0].strip() if lines else ''}"
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(str(part) for part in err['loc']) or e.title}: {err['msg']}" for err in e.errors())
    if type(e).__name__ == "SafetensorError":  # safetensors' Rust error: no file name of its own
        return f"a safetensors file is unreadable: {_one_line(str(e))}"
    if isinstance(e, (ValueError, OSError, NotImplementedError, RuntimeError)):  # OSError: files, sockets, Ray's ConnectionError
        return _one_line(str(e)) or type(e).__name__
    return None


def _planned(name: str, what: str):  # noqa: ANN202
    def run(_: argparse.Namespace) -> int:
        raise NotImplementedError(f"'{name}' is not implemented yet; it needs {what}")

    return run


def _add_make_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a toy-size HF checkpoint of the real architecture")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--arch", choices=["deepseek-v3", "kimi-k2"], default="deepseek-v3")
    p.add_argument("--quant", choices=["none", "fp8", "int4"], default="none",
                   help="none: bf16; fp8: DeepSeek-V3 block FP8; int4: Kimi-K2-Thinking INT4 routed experts")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=3, help="decoder layers (the first is dense)")
    p.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--q-lora-rank", type=int, default=96, help="0: no q compression")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size of the tokenizer")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny)


def _make_tiny(args: argparse.Namespace) -> int:
    from moecluster.workers.checkpoint.tiny import INDEX_FILE, SHARD_FILES, TinySpec, make_tiny

    spec = TinySpec(
        arch=args.arch, quant=args.quant, hidden_size=args.hidden_size, num_layers=args.layers,
        num_experts=args.experts, num_heads=args.heads, q_lora_rank=args.q_lora_rank or None,
        vocab_size=args.vocab_size, seed=args.seed,
    )
    with _output_dir(args.out, "make-tiny", SLICE_FILES | {INDEX_FILE, *SHARD_FILES}):
        out = make_tiny(args.out, spec)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {spec.arch} ({spec.quant}) to {out} ({size / 2**20:.1f} MiB)")
    return 0


def _add_make_slice(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-slice", help="a few layers of a full-size model at the published shapes: config + "
                                          "tokenizer, no weights (serve with engine.load_format: random)")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--model", default="deepseek-v3", help="deepseek-v3 (FP8), kimi-k2 (FP8), kimi-k2-thinking (INT4)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--dense-layers", type=int, default=1, help="how many of them are dense (the rest MoE)")
    p.add_argument("--routed-experts", type=int, default=None,
                   help="fewer routed experts (top-k and groups unchanged): one EP rank's share on one GPU")
    p.set_defaults(func=_make_slice)


def _make_slice(args: argparse.Namespace) -> int:
    from moecluster.cluster.bench.slice_model import make_slice

    with _output_dir(args.out, "make-slice", SLICE_FILES):
        out = make_slice(args.out, args.model, args.layers, args.dense_layers, args.routed_experts)
    print(f"wrote a {args.layers}-layer slice of {args.model} to {out} (serve it with engine.load_format: random)")
    return 0


SLICE_FILES = frozenset({"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"})


@contextmanager
def _output_dir(out: Path, command: str, writes: frozenset[str]) -> Iterator[None]:
    """The directory a checkpoint writer fills: new, empty, or what the same command wrote before
    (rewritten whole). Anything else is refused rather than overwritten in part (a real checkpoint's
    config.json, or a tiny checkpoint's shards left beside a slice's config). A directory this
    command created is removed again when it fails."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    existed = out.exists()
    if existed:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in writes)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise FileExistsError(f"{out} is not empty and holds files {command} does not write ({shown}); "
                                  "choose a new or empty directory")
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="deploy on Ray (embedded local, or --address) behind gRPC + OpenAI HTTP")
    p.add_argument("--spec", help="deployment spec (YAML)")
    p.add_argument("--model", help="without --spec: serve this checkpoint on one CPU replica")
    p.add_argument("--address", help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting one")
    p.set_defaults(func=_serve)
    p = sub.add_parser("status", help="pools, replicas, ranks, health, KV usage and queues of a running deployment")
    p.add_argument("--url", help="router gRPC address host:port (default: from the state file `serve` wrote)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)
    p = sub.add_parser("down", help="stop a running deployment")
    p.add_argument("--address", help="a Ray cluster whose moecluster actors to remove (when its driver is gone)")
    p.set_defaults(func=_down)


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from moecluster.cluster.serve import load_spec, run_forever, start

    spec = load_spec(args.spec, args.model)
    stop = threading.Event()

    def interrupt(*_: object) -> None:
        # Ctrl-C / SIGTERM while Ray starts and ranks load: abandon the start (it cleans up after
        # itself); should Ray's waits swallow the KeyboardInterrupt, `stop` still ends the serve.
        if not stop.is_set():
            stop.set()
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupt)
    run_forever(start(spec, address=args.address), stop)
    return 0


def _status(args: argparse.Namespace) -> int:
    import os

    from google.protobuf.json_format import MessageToDict

    from moecluster.cluster.serve import API_KEY_ENV, live_state
    from moecluster.router.requests.client import Client

    with Client(args.url or live_state()["grpc"], api_key=os.environ.get(API_KEY_ENV)) as client:
        status = client.status()
    if args.json:
        print(json.dumps(MessageToDict(status, always_print_fields_with_no_presence=True)))
        return 0
    print(f"model {status.model}: {status.open_requests} open requests, {status.failovers} failovers")
    for r in status.replicas:
        print(f"  {r.name:<12} {r.role:<8} {'healthy' if r.healthy else 'UNHEALTHY':<10} {r.open_requests} open")
        for k in r.ranks:
            print(f"    rank {k.rank}: {'alive' if k.alive else 'DEAD':<5} running {k.running:<4} waiting {k.waiting:<4} "
                  f"KV {k.kv_usage:6.1%} ({k.total_blocks - k.free_blocks}/{k.total_blocks} blocks) "
                  f"prefix hits {k.prefix_hit_rate:.1%}")
    return 0


def _down(args: argparse.Namespace) -> int:
    import os
    import signal
    import time

    from moecluster.cluster.serve import check_ray_reachable, read_state, recorded_server_running, state_path

    if args.address:
        import ray

        from moecluster.cluster.replica import NAMESPACE

        check_ray_reachable(args.address)
        ray.init(address=args.address, namespace=NAMESPACE)
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
        for a in actors:
            ray.kill(ray.get_actor(a["name"], namespace=NAMESPACE))
        print(f"removed {len(actors)} moecluster actors from {args.address}")
        return 0
    state = read_state()
    pid = state["pid"]
    try:
        if not recorded_server_running(state):  # gone, or its pid now another process's: never signal that
            raise ProcessLookupError
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state_path().unlink(missing_ok=True)
        print(f"the recorded server (pid {pid}) was not running; state cleared")
        return 0
    for _ in range(600):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"stopped {state.get('model')} (pid {pid})")
            return 0
        time.sleep(0.1)
    raise RuntimeError(f"pid {pid} did not stop within 60 s")


def _add_autoscale(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("autoscale", help="autoscaling: simulate a policy on a request trace, write traces")
    p.set_defaults(func=_autoscale_tool_missing)
    tools = p.add_subparsers(dest="tool", metavar="TOOL")
    s = tools.add_parser("simulate", help="replay a trace under a policy and under static peak provisioning: "
                                          "SLO attainment against GPU-hours (report.json, replicas.png)")
    s.add_argument("--trace", type=Path, required=True, help="JSONL or CSV, one request a line: arrival_s, prompt_tokens, output_tokens")
    s.add_argument("--policy", help="slo, or a class path module.sub:Class (default: the spec's, else slo)")
    s.add_argument("--spec", type=Path, help="deployment spec (YAML): pools, sizes, autoscaling bounds and targets "
                                             "(default: one colocated pool of 1..8 replicas)")
    s.add_argument("--model", type=Path, help="replica model: JSON of ServiceModel fields, or a `bench engine` "
                                              "result (default: DeepSeek-V3 on 8 x H200)")
    s.add_argument("--static", type=_pool_counts, help="static replicas per pool, e.g. decode=4,prefill=2 (default: the policy's peak)")
    s.add_argument("--out", type=Path, default=Path("autoscale-sim"), help="directory for report.json and replicas.png")
    s.set_defaults(func=_autoscale_simulate)
    t = tools.add_parser("trace", help="write a synthetic bursty trace (JSONL, or CSV for a .csv name)")
    t.add_argument("out", type=Path)
    t.add_argument("--duration", type=float, default=3600.0, help="seconds")
    t.add_argument("--base-rps", type=float, default=2.0)
    t.add_argument("--burst-rps", type=float, default=20.0)
    t.add_argument("--burst-every", type=float, default=1800.0, help="a burst starts every this many seconds")
    t.add_argument("--burst-len", type=float, default=300.0, help="seconds at the burst rate")
    t.add_argument("--ramp", type=float, default=600.0, help="seconds ramping up to the burst rate and back (0: square)")
    t.add_argument("--prompt-median", type=int, default=1024, help="tokens (log-normal, sigma 0.8)")
    t.add_argument("--output-median", type=int, default=256, help="tokens (log-normal, sigma 0.8)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_autoscale_trace)


def _autoscale_tool_missing(_: argparse.Namespace) -> int:
    raise ValueError("name a tool: simulate, trace")


def _pool_counts(text: str) -> dict[str, int]:
    try:
        pairs = [item.split("=") for item in text.split(",")]
        return {pool: int(n) for pool, n in pairs} if "=" in text else {"decode": int(text)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected pool=count pairs such as decode=4,prefill=2, got {text!r}") from None


def _autoscale_simulate(args: argparse.Namespace) -> int:
    from moecluster.cluster.autoscale.service_model import load_service_model
    from moecluster.cluster.autoscale.sim_report import main as simulate

    model = load_service_model(args.model) if args.model else None
    simulate(args.trace, args.spec, args.policy, args.out, model=model, static_replicas=args.static)
    return 0


def _autoscale_trace(args: argparse.Namespace) -> int:
    from moecluster.cluster.autoscale.trace import LengthDist, make_bursty_trace, trace_stats, write_trace

    trace = make_bursty_trace(args.duration, args.base_rps, args.burst_rps, args.burst_every, args.burst_len,
                              prompt=LengthDist(args.prompt_median, 0.8, 16, 16 * args.prompt_median),
                              output=LengthDist(args.output_median, 0.8, 1, 16 * args.output_median),
                              seed=args.seed, ramp_s=args.ramp)
    if not trace:
        raise ValueError("the trace would hold no requests (--base-rps and --burst-rps are 0?); nothing written")
    stats = trace_stats(trace)
    print(f"wrote {write_trace(args.out, trace)}: {stats['requests']} requests over {stats['span_s']:.0f} s, "
          f"peak {stats['peak_rps']:.1f} requests/s")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate in this process (offline API), or from a running server (--url)")
    p.add_argument("--model", type=Path, help="checkpoint directory (offline)")
    p.add_argument("--url", help="a running router's gRPC address host:port ('auto': from the state file)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template")
    p.add_argument("--max-tokens", type=_positive_int, default=32)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0)
    p.add_argument("--top-p", type=_probability, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=_generate)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _probability(text: str) -> float:
    value = _non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def _require_cuda(device: str | None, what: str) -> None:
    """A CUDA device asked for on a machine without one: say so, before anything loads."""
    if device is None or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} --device {device}: no CUDA GPU is available here "
                           f"({'torch was built without CUDA' if torch.version.cuda is None else 'none visible'})")


def _generate(args: argparse.Namespace) -> int:
    if args.url and args.model is not None:
        raise ValueError("give --model DIR (offline) or --url HOST:PORT (a running server), not both")
    if args.url:
        return _generate_remote(args)
    if args.model is None:
        raise ValueError("give --model DIR (offline) or --url HOST:PORT (a running server)")
    from moecluster import LLM, SamplingParams
    from moecluster.cluster.spec import check_checkpoint

    _require_cuda(args.device, "generate")
    check_checkpoint(args.model)

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed
    )
    tok = llm.get_tokenizer()
    prompts = [
        {"prompt_token_ids": tok.apply_chat_template([{"role": "user", "content": p}]), "prompt": p} if args.chat else p
        for p in args.prompt
    ]
    for out in llm.generate(prompts, params):
        c = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}))
        else:
            print(f"--- {out.prompt!r}\n{c.text}\n[{len(c.token_ids)} tokens, finish_reason={c.finish_reason}]")
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    import os

    from moecluster.cluster.serve import API_KEY_ENV, live_state
    from moecluster.router.requests.client import Client

    target = live_state()["grpc"] if args.url == "auto" else args.url
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "max_tokens": args.max_tokens}
    if args.seed is not None:
        sampling["seed"] = args.seed
    with Client(target, api_key=os.environ.get(API_KEY_ENV)) as client:
        for prompt in args.prompt:
            if args.chat:
                out = client.complete(messages=[{"role": "user", "content": prompt}], **sampling)
            else:
                out = client.complete(prompt, **sampling)
            text, reason = out.texts.get(0, ""), out.finish_reasons.get(0)
            if args.json:
                print(json.dumps({"prompt": prompt, "text": text, "token_ids": out.token_ids.get(0, []),
                                  "finish_reason": reason, "request_id": out.request_id}))
            else:
                print(f"--- {prompt!r}\n{text}\n[{len(out.token_ids.get(0, []))} tokens, finish_reason={reason}]")
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-GPU memory: weights, headroom and latent cache for a model on H100/H200 nodes")
    p.add_argument("--model", required=True,
                   help="checkpoint directory, or a preset: deepseek-v3, kimi-k2, kimi-k2-thinking")
    p.add_argument("--gpu", required=True, help="h100 or h200")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--context", type=_tokens, default=None,
                   help="tokens per sequence, e.g. 131072 or 128K (default: the model's max_position_embeddings)")
    p.add_argument("--ep", type=int, default=None, help="EP ranks per replica (default: every GPU, one replica)")
    p.add_argument("--kv-dtype", default="bf16", help="latent cache dtype: bf16 or fp8")
    p.add_argument("--max-batched-tokens", type=int, default=8192, help="tokens per forward, sizes the activation headroom")
    p.add_argument("--reserve-gib", type=float, default=3.0,
                   help="memory in use per GPU before the engine sizes its cache (CUDA context, loading's cached "
                        "blocks)")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="the spec's cache.memory_fraction: the share of the GPU for weights, cache and activations")
    p.add_argument("--redundant-experts", type=int, default=0, help="EPLB expert slots per replica beyond one per expert")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_plan)


def _tokens(text: str) -> int:
    scale = 1024 if text[-1:] in ("k", "K") else 1
    try:
        return int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count such as 131072 or 128K, got {text!r}") from None


def _plan(args: argparse.Namespace) -> int:
    from moecluster.cluster.plan import PlanConfig, make_plan, plan_to_dict, print_plan

    cfg = PlanConfig(gpu=args.gpu, gpus_per_node=args.gpus_per_node, nodes=args.nodes, context=args.context, ep=args.ep,
                     kv_dtype=args.kv_dtype, max_batched_tokens=args.max_batched_tokens, reserve_gib=args.reserve_gib,
                     memory_fraction=args.memory_fraction, redundant_experts=args.redundant_experts)
    plan = make_plan(args.model, cfg)
    if args.json:
        print(json.dumps(plan_to_dict(plan), indent=2))
    else:
        print_plan(plan)
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: print a table and write JSON")
    p.set_defaults(func=_bench_target_missing)
    targets = p.add_subparsers(dest="target", metavar="TARGET")
    e = targets.add_parser("engine", help="host time per engine step; prefix-cache hit rate on an agent trace")
    e.add_argument("--requests", type=_counts, default=None, help="running requests per case (default 64,128,256)")
    e.add_argument("--steps", type=int, default=None, help="timed steps per case (default 300)")
    e.add_argument("--turns", type=int, default=None, help="turns per agent session (default 20)")
    e.add_argument("--sessions", type=int, default=None, help="concurrent agent sessions (default 4)")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--out", type=Path, default=Path("bench-engine.json"), help="JSON result file")
    e.add_argument("--quick", action="store_true", help="small sizes (for tests)")
    e.set_defaults(func=_bench_engine)
    ep = targets.add_parser("eplb", help="expert load balance per rank before and after EPLB on a skewed trace")
    ep.add_argument("--experts", type=int, default=None, help="routed experts per layer (default 256)")
    ep.add_argument("--ranks", type=int, default=None, help="EP ranks (default 32)")
    ep.add_argument("--redundant", type=int, default=None, help="redundant expert slots (default 32)")
    ep.add_argument("--nodes", type=int, default=None, help="nodes the ranks span (default 4)")
    ep.add_argument("--groups", type=int, default=None, help="expert groups, the gate's n_group (default 8)")
    ep.add_argument("--zipf", type=float, default=None, help="Zipf exponent of expert popularity (default 1.2)")
    ep.add_argument("--tokens", type=int, default=None, help="tokens per layer per trace (default 65536)")
    ep.add_argument("--layers", type=int, default=None, help="MoE layers (default 4)")
    ep.add_argument("--keep-slack", type=float, default=None,
                    help="load above the mean a rank may take to keep experts in place (default 0.01)")
    ep.add_argument("--seed", type=int, default=None)
    ep.add_argument("--out", type=Path, default=Path("bench-eplb.json"), help="JSON result file")
    ep.add_argument("--quick", action="store_true", help="small sizes (for tests)")
    ep.set_defaults(func=_bench_eplb)
    a = targets.add_parser("a2a", help="expert-parallel dispatch + combine time and bandwidth between local GPUs")
    a.add_argument("--tokens", type=_positive_int, default=4096)
    a.add_argument("--hidden", type=_positive_int, default=7168)
    a.add_argument("--top-k", type=_positive_int, default=8)
    a.add_argument("--experts", type=_positive_int, default=256)
    a.add_argument("--world", type=int, default=0, help="ranks (default: every visible GPU)")
    a.add_argument("--iters", type=_positive_int, default=20)
    a.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a gloo smoke run")
    a.add_argument("--out", type=Path, default=Path("bench-a2a.json"), help="JSON result file")
    a.set_defaults(func=_bench_a2a)
    k = targets.add_parser("kernels", help="GPU: MLA decode and fused MoE against copy bandwidth, SGLang, _grouped_mm")
    k.add_argument("--only", choices=["mla", "moe", "linear"], action="append",
                   help="one part (repeatable; default all)")
    k.add_argument("--quick", action="store_true", help="one shape per part (a smoke run)")
    k.add_argument("--out", type=Path, default=Path("bench-kernels.json"), help="JSON result file")
    k.set_defaults(func=_bench_kernels)
    r = targets.add_parser("router", help="what the router adds per streamed delta, over a fast fake engine")
    r.add_argument("--tokenizer", type=Path, required=True, help="a checkpoint directory to take the tokenizer from")
    r.add_argument("--concurrency", type=_positive_int, default=256)
    r.add_argument("--requests", type=_positive_int, default=2048)
    r.add_argument("--tokens", type=_positive_int, default=32, help="tokens per request")
    r.add_argument("--step-ms", type=_non_negative_float, default=20.0, help="the fake engine's step time")
    r.add_argument("--out", type=Path, default=Path("bench-router.json"), help="JSON result file")
    r.set_defaults(func=_bench_router)
    _add_bench_serve(targets)


def _bench_kernels(args: argparse.Namespace) -> int:
    from moecluster.cluster.bench.kernels import KernelBenchConfig, main as bench

    cfg = KernelBenchConfig(only=tuple(args.only or ("mla", "moe", "linear")))
    if args.quick:
        cfg = KernelBenchConfig(mla_batches=(8,), mla_contexts=(1024,), mla_heads=(128,), moe_tokens_per_expert=(8,),
                                moe_experts=4, linear_rows=(16, 1024), only=cfg.only)
    bench(cfg, args.out)
    return 0


def _bench_router(args: argparse.Namespace) -> int:
    from moecluster.cluster.bench.router import RouterBenchConfig, main as bench

    cfg = RouterBenchConfig(concurrency=args.concurrency, requests=args.requests, tokens=args.tokens,
                            step_s=args.step_ms / 1e3)
    bench(cfg, args.tokenizer, args.out)
    return 0


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _bench_target_missing(_: argparse.Namespace) -> int:
    raise ValueError("name a benchmark: engine, eplb, a2a, router, kernels, serve (or plot-serve)")


def _bench_engine(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from moecluster.cluster.bench.engine import EngineBenchConfig, run

    cfg = EngineBenchConfig.quick_sizes() if args.quick else EngineBenchConfig()
    names = ("requests", "steps", "turns", "sessions", "seed")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    run(replace(cfg, **given), args.out)
    return 0


def _bench_eplb(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from moecluster.cluster.bench.eplb import EplbBenchConfig, run

    cfg = EplbBenchConfig.quick_sizes() if args.quick else EplbBenchConfig()
    names = ("experts", "ranks", "redundant", "nodes", "groups", "zipf", "tokens", "layers", "keep_slack", "seed")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    run(replace(cfg, **given), args.out)
    return 0


def _bench_a2a(args: argparse.Namespace) -> int:
    from moecluster.cluster.bench.all_to_all import A2ABenchConfig, run

    if args.top_k > args.experts:
        raise ValueError(f"--top-k {args.top_k} exceeds --experts {args.experts}: each token picks top-k distinct experts")
    run(A2ABenchConfig(tokens=args.tokens, hidden=args.hidden, top_k=args.top_k, experts=args.experts,
                       world=args.world, iters=args.iters, device=args.device), args.out)
    return 0



def _mixes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple(tuple(int(x) for x in part.split(":")) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IN:OUT[,IN:OUT...], e.g. 2000:100,8000:1000; got {text!r}") from None
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected IN:OUT pairs of positive token counts, got {text!r}")
    return pairs  # type: ignore[return-value]


def _add_bench_serve(targets: argparse._SubParsersAction) -> None:
    s = targets.add_parser("serve", help="the served stack (Ray ranks, router, gRPC) under a request mix at rising "
                                         "concurrency; transformers eager baseline; decode roofline")
    s.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: a slice of --preset)")
    s.add_argument("--preset", default="deepseek-v3", help="slice of deepseek-v3, kimi-k2 or kimi-k2-thinking")
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--dense-layers", type=int, default=1)
    s.add_argument("--routed-experts", type=int, default=None,
                   help="a slice with this many routed experts: on one GPU, an EP rank's share at full depth "
                        "(e.g. 48 of K2-Thinking's 384 for EP=8)")
    s.add_argument("--load-format", choices=["random", "safetensors"], default=None,
                   help="default: random for a slice, safetensors for --model")
    s.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    s.add_argument("--ep", type=int, default=1, help="EP ranks (GPUs) per decode replica")
    s.add_argument("--replicas", type=int, default=1, help="decode replicas")
    s.add_argument("--prefill-ep", type=int, default=None, help="add a prefill pool of one replica of this EP size")
    s.add_argument("--mix", type=_mixes, default=((2000, 100),), help="IN:OUT[,IN:OUT] tokens (default 2000:100)")
    s.add_argument("--concurrency", type=_counts, default=(1, 16, 64), help="levels (default 1,16,64)")
    s.add_argument("--waves", type=int, default=2, help="requests per level = concurrency x waves")
    s.add_argument("--memory-fraction", type=float, default=0.9)
    s.add_argument("--baseline-concurrency", type=int, default=64)
    s.add_argument("--baseline-steps", type=int, default=8)
    s.add_argument("--no-baseline", action="store_true", help="skip the transformers eager baseline")
    s.add_argument("--no-roofline", action="store_true", help="skip the copy bandwidth, roofline and MoE layer step")
    s.add_argument("--no-warmup", action="store_true")
    s.add_argument("--warmup-streams", type=int, default=None,
                   help="streams of the warm-up levels (default: the largest level's; fewer saves a long prefill)")
    s.add_argument("--no-prefill-level", action="store_true", help="skip the prefill-only level before each mix")
    s.add_argument("--cuda-graph-max-batch", type=int, default=512, help="decode CUDA graphs up to this batch (0: eager)")
    s.add_argument("--no-async-scheduling", action="store_true",
                   help="read each decode step's samples before scheduling the next (no host/GPU overlap)")
    s.add_argument("--decode-experts-w16", action="store_true",
                   help="FP8 routed experts run W8A16 in the decode CUDA graphs (default: W8A8)")
    s.add_argument("--decode-linears-w16", action="store_true",
                   help="FP8 dense linears run W8A16 in the decode CUDA graphs (default: W8A8 from 16 rows)")
    s.add_argument("--client-procs", type=int, default=0,
                   help="load-generator processes per level (default: one per 32 streams, at most the CPUs less one)")
    s.add_argument("--out", type=Path, default=Path("bench-serve.json"), help="JSON result file")
    s.add_argument("--png", type=Path, default=None, help="plot file (needs matplotlib)")
    s.set_defaults(func=_bench_serve)
    p = targets.add_parser("plot-serve", help="draw the PNG of a `bench serve` JSON result")
    p.add_argument("result", type=Path)
    p.add_argument("--png", type=Path, required=True)
    p.set_defaults(func=_plot_serve)


def _bench_serve(args: argparse.Namespace) -> int:
    from moecluster.cluster.bench.serve import ServeBenchConfig, main as bench

    load_format = args.load_format or ("safetensors" if args.model else "random")
    cfg = ServeBenchConfig(
        model=args.model, preset=args.preset, layers=args.layers, dense_layers=args.dense_layers,
        routed_experts=args.routed_experts, load_format=load_format, device=args.device, dtype=args.dtype,
        ep=args.ep, replicas=args.replicas,
        prefill_ep=args.prefill_ep, mixes=args.mix, concurrency=tuple(args.concurrency), waves=args.waves,
        memory_fraction=args.memory_fraction, baseline=not args.no_baseline, roofline=not args.no_roofline,
        baseline_concurrency=args.baseline_concurrency, baseline_steps=args.baseline_steps, warmup=not args.no_warmup,
        warmup_streams=args.warmup_streams, prefill_level=not args.no_prefill_level,
        cuda_graph_max_batch=args.cuda_graph_max_batch, async_scheduling=not args.no_async_scheduling,
        decode_experts_w8a8=not args.decode_experts_w16, decode_linears_w8a8=not args.decode_linears_w16,
        client_procs=args.client_procs,
    )
    bench(cfg, args.out, args.png)
    return 0


def _plot_serve(args: argparse.Namespace) -> int:
    from moecluster.cluster.bench.serve_plot import plot

    try:
        result = json.loads(args.result.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{args.result}: not a readable `bench serve` result ({e})") from None
    print(f"wrote {plot(result, args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
