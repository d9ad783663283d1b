"""A prefill pool and decode pools on a local Ray cluster: same tokens as one process, and streams
survive a killed decode or prefill rank."""

from __future__ import annotations

import json
import logging
import time

import pytest

ray = pytest.importorskip("ray")

from moecluster import LLM, SamplingParams  # noqa: E402
from moecluster.cluster.deployment import Deployment  # noqa: E402
from moecluster.cluster.replica import NAMESPACE  # noqa: E402
from moecluster.cluster.spec import DeploymentSpec  # noqa: E402
from tests.cluster.streams import drive, wait_healthy  # noqa: E402

STREAMS = 32
NEW_TOKENS = 16
ENGINE = dict(dtype="float32", block_size=16, num_kv_blocks=96)


def split_spec(ckpt) -> DeploymentSpec:  # noqa: ANN001
    return DeploymentSpec.parse({
        "model": str(ckpt),
        "prefill": {"replicas": 1, "ep": 2, "device": "cpu"},
        "decode": {"replicas": 2, "ep": 2, "device": "cpu"},
        "cache": {"block_size": ENGINE["block_size"], "num_blocks": ENGINE["num_kv_blocks"]},
        "engine": {"dtype": "float32"},
    })


@pytest.fixture(scope="module")
def workload(tiny_checkpoint):
    ckpt = tiny_checkpoint(num_layers=2)
    prompts = [[(7 * i + 3 * j) % 900 + 2 for j in range(4 + 3 * i)] for i in range(STREAMS)]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(ckpt, device="cpu", **ENGINE).generate(
        [{"prompt_token_ids": p} for p in prompts], params)]
    return ckpt, {f"r{i}": (p, params) for i, p in enumerate(prompts)}, want


@pytest.fixture(scope="module")
def deployment(local_ray, workload):
    dep = Deployment(split_spec(workload[0]), health_interval_s=0.5)
    yield dep
    dep.shutdown()


def kill_when(actor: str, after_tokens: int):  # noqa: ANN201
    def during(total: int) -> bool:
        if total < after_tokens:
            return False
        ray.kill(ray.get_actor(actor, namespace=NAMESPACE))
        return True

    return during


def kill_while_running(dep: Deployment, replica: str, actor: str, after_tokens: int):  # noqa: ANN201
    """Kill `actor` once `after_tokens` tokens were delivered and its replica still runs at least
    two sequences (a kill at a token count alone found, in one CI run, the replica already done
    with its streams: nothing to fail over)."""
    def during(total: int) -> bool:
        if total < after_tokens:
            return False
        running = [r["stats"].num_running for s in dep.status() if s["name"] == replica for r in s["ranks"]]
        if not running or max(running) < 2:
            return False
        ray.kill(ray.get_actor(actor, namespace=NAMESPACE))
        return True

    return during


def assert_all_blocks_free(dep: Deployment) -> None:
    """Nothing leaked: every rank of every pool has all its cache blocks free again."""
    deadline = time.time() + 30
    while True:
        ranks = [r for s in dep.status() for r in s["ranks"]]
        if all(r["stats"].num_free_blocks == r["stats"].num_blocks for r in ranks) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert [(r["role"], r["stats"].num_free_blocks) for r in ranks] == [(r["role"], r["stats"].num_blocks) for r in ranks]


def test_split_pools_equal_one_process_through_a_killed_decode_rank(deployment, workload, caplog) -> None:
    _, requests, want = workload
    caplog.set_level(logging.INFO, logger="moecluster.requests")
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
    assert {"prefill-0-rank-0", "prefill-0-rank-1", "decode-0-rank-1", "decode-1-rank-1"} <= names
    before = deployment.failovers
    got = drive(deployment, requests, kill_while_running(deployment, "decode-1", "decode-1-rank-0", STREAMS))
    assert [got[f"r{i}"] for i in range(STREAMS)] == [{0: w} for w in want]
    assert deployment.failovers > before
    assert wait_healthy(deployment)  # the group came back
    assert_all_blocks_free(deployment)

    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "moecluster.requests"]
    by_request: dict[str, list[str]] = {}
    for e in events:
        by_request.setdefault(e["request_id"], []).append(e["event"])
    for rid in requests:
        kinds = by_request[rid]
        assert kinds[0] == "accepted" and kinds[-1] == "finished", (rid, kinds)
        assert {"placed", "handoff", "kv_taken"} <= set(kinds), (rid, kinds)
    assert any("failover" in kinds for kinds in by_request.values())


def test_killed_prefill_rank_loses_and_repeats_nothing(deployment, workload) -> None:
    """The prefill rank dies right after the last submit, while it still holds prompts (killed later,
    every sample may already sit with the decode pool and nothing fails over: timing decides; the
    p2p test covers that case)."""
    _, requests, want = workload
    assert wait_healthy(deployment)
    before = deployment.failovers
    got = drive(deployment, requests, kill_when("prefill-0-rank-1", 0))
    assert [got[f"r{i}"] for i in range(STREAMS)] == [{0: w} for w in want]
    assert deployment.failovers > before
    assert wait_healthy(deployment)
    assert_all_blocks_free(deployment)


def test_abort_and_n2_across_pools(deployment, workload) -> None:
    """Aborted streams end with "abort" and free their blocks on both pools; n=2 greedy samples
    are handed over separately and both match."""
    _, requests, want = workload
    assert wait_healthy(deployment)
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    import queue

    deltas: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(4):
        deployment.submit(f"long{i}", requests[f"r{i}"][0], long, deltas.put)
    pair = requests["r5"][1].model_copy(update={"n": 2})
    got = drive(deployment, {"pair": (requests["r5"][0], pair)})
    assert got["pair"] == {0: want[5], 1: want[5]}
    seen: dict[str, int] = {}
    while len(seen) < 4:
        d = deltas.get(timeout=60)
        seen[d.request_id] = seen.get(d.request_id, 0) + len(d.outputs[0].token_ids)
    for i in range(4):
        deployment.abort(f"long{i}")
    ends = {}
    while len(ends) < 4:
        d = deltas.get(timeout=60)
        if d.finished:
            ends[d.request_id] = [o.finish_reason for o in d.outputs]
    assert ends == {f"long{i}": ["abort"] for i in range(4)}
    # an aborted id can be used again at once (its replica-side stream is released with the abort)
    again = drive(deployment, {"long0": (requests["r0"][0], requests["r0"][1])})
    assert again["long0"] == {0: want[0]}
    assert deployment.num_open() == 0
    assert_all_blocks_free(deployment)


def _tokens_until(deltas: "queue.SimpleQueue", n: int, got: list[int], prompt: tuple | None = None) -> None:
    while len(got) < n:
        d = deltas.get(timeout=60)
        assert not isinstance(d, BaseException), d
        assert not d.finished, d
        if prompt is not None:  # the ranks send outputs without it (ep_rank); the deployment puts it back
            assert (d.prompt, d.prompt_token_ids) == prompt
        got.extend(d.outputs[0].token_ids)


def test_an_id_reused_after_abort_gets_none_of_the_old_requests_outputs(deployment, workload) -> None:
    """A client may reuse an id as soon as it aborted it, while the old inner request's last
    outputs are still on their way from a rank. Replayed into every decode replica once the new
    request decodes there, the old decode request's final ("abort") output must not reach the new
    stream, which continues as one process would."""
    import queue

    from moecluster.workers.engine.outputs import CompletionOutput, RequestOutput, to_wire

    _, requests, want = workload
    assert wait_healthy(deployment)
    prompt = requests["r1"][0]
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    first: queue.SimpleQueue = queue.SimpleQueue()
    deployment.submit("reuse", prompt, long, first.put, "the prompt's text")
    _tokens_until(first, 3, [], ("the prompt's text", prompt))  # decoding on the decode pool
    old_ids = [i for i in deployment._streams["reuse"].routes if "@" in i]
    assert old_ids
    deployment.abort("reuse")
    second: queue.SimpleQueue = queue.SimpleQueue()
    deployment.submit("reuse", prompt, long, second.put)
    got: list[int] = []
    _tokens_until(second, 3, got)  # the new request decodes on the decode pool too
    stale = [RequestOutput(i, None, [], [CompletionOutput(0, "", [7], finish_reason="abort")], finished=True)
             for i in old_ids]
    for _, replica in deployment.pools["decode"].healthy():
        replica.streams.handle(("out", 0, to_wire(stale)))
    _tokens_until(second, NEW_TOKENS, got)
    assert got[:NEW_TOKENS] == want[1]
    deployment.abort("reuse")
    assert wait_healthy(deployment)
    deadline = time.time() + 30
    while deployment.num_open() and time.time() < deadline:
        time.sleep(0.1)
    assert deployment.num_open() == 0


def test_a_handoff_that_cannot_be_placed_resumes_from_what_it_delivered(deployment, workload, monkeypatch) -> None:
    """The decode side refuses a handoff with an unexpected error (not a dead replica): its sample,
    whose first token already went out, resumes on the prefill pool from prompt + that token."""
    from moecluster.cluster.replica import Replica

    _, requests, want = workload
    assert wait_healthy(deployment)
    real = Replica.submit_prefilled
    failed: list[str] = []

    def flaky(self, inner_id, handoff, sink):  # noqa: ANN001, ANN202
        if not failed:
            failed.append(inner_id)
            raise RuntimeError("injected: the decode replica's actor handle broke")
        return real(self, inner_id, handoff, sink)

    monkeypatch.setattr(Replica, "submit_prefilled", flaky)
    some = dict(list(requests.items())[:4])
    got = drive(deployment, some)
    assert failed, "no handoff was placed"
    assert [got[f"r{i}"] for i in range(4)] == [{0: w} for w in want[:4]]
    assert deployment.failovers >= 1
    assert_all_blocks_free(deployment)
