"""The SLO policy's decisions, policy loading, and the live autoscaler on a local CPU Ray cluster:
a burst grows the decode pool, a quiet period drains it back, and no request is lost."""

from __future__ import annotations

import queue
import time

import pytest

from moecluster.cluster.autoscale.policy import PoolMetrics, SLOPolicy, load_policy
from moecluster.cluster.spec import AutoscalingSpec, SLOTargets


def decode(**kw) -> PoolMetrics:  # noqa: ANN003
    return PoolMetrics(pool="decode", role="decode", replicas=kw.pop("replicas", 2), **kw)


class Fixed:
    def __init__(self, size: int) -> None:
        self.size = size

    def decide(self, metrics, replicas):  # noqa: ANN001, ANN201
        return {name: self.size for name in metrics}


def test_slo_policy_scales_up_in_proportion_and_down_with_hysteresis() -> None:
    p = SLOPolicy(SLOTargets(itl_s=0.1, kv_high=0.8, kv_low=0.3, down_intervals=3))
    assert p.decide({"decode": decode(itl_p90=0.3)}, {"decode": 2}) == {"decode": 6}  # 3x over: +4
    assert p.decide({"decode": decode(itl_p90=0.11)}, {"decode": 2}) == {"decode": 3}  # just over: +1
    assert p.decide({"decode": decode(kv_usage=0.9)}, {"decode": 2}) == {"decode": 3}  # KV pressure
    quiet = decode(itl_p90=0.01, kv_usage=0.1)
    assert [p.decide({"decode": quiet}, {"decode": 2})["decode"] for _ in range(3)] == [2, 2, 1]
    middling = decode(itl_p90=0.07, kv_usage=0.1)  # under target but not "low": no flapping
    assert all(p.decide({"decode": middling}, {"decode": 2})["decode"] == 2 for _ in range(5))


def test_slo_policy_prefill_signals_and_an_empty_pool() -> None:
    p = SLOPolicy(SLOTargets(ttft_s=1.0, queue_s=0.5))
    prefill = PoolMetrics(pool="prefill", role="prefill", replicas=1, ttft_p90=0.4, queue_p90=1.5)
    assert p.decide({"prefill": prefill}, {"prefill": 1}) == {"prefill": 3}
    empty = PoolMetrics(pool="prefill", role="prefill", replicas=0, waiting=3)
    assert p.decide({"prefill": empty}, {"prefill": 0}) == {"prefill": 1}


def test_load_policy_slo_and_user_class() -> None:
    assert isinstance(load_policy(AutoscalingSpec()), SLOPolicy)
    user = load_policy(AutoscalingSpec(policy="tests.cluster.test_autoscale:Fixed", options={"size": 3}))
    assert user.decide({"decode": decode()}, {"decode": 1}) == {"decode": 3}
    with pytest.raises(ValueError, match="autoscaling.policy"):
        load_policy(AutoscalingSpec(policy="no_such_module:Policy"))
    with pytest.raises(ValueError, match="autoscaling.options"):
        load_policy(AutoscalingSpec(policy="tests.cluster.test_autoscale:Fixed", options={"bogus": 1}))


def test_burst_scales_decode_up_and_quiet_drains_it(local_ray, tiny_checkpoint) -> None:
    from moecluster.cluster.autoscale.controller import Autoscaler
    from moecluster.cluster.deployment import Deployment
    from moecluster.cluster.spec import DeploymentSpec
    from moecluster.workers.engine.sampling_params import SamplingParams

    spec = DeploymentSpec.parse({
        "model": str(tiny_checkpoint(num_layers=2)),
        "decode": {"replicas": 1, "ep": 1, "device": "cpu"},
        "cache": {"block_size": 16, "num_blocks": 128},
        "engine": {"dtype": "float32"},
        "autoscaling": {"decode": {"min_replicas": 1, "max_replicas": 2}, "interval_s": 2.0, "cooldown_s": 0.0,
                        "targets": {"itl_s": 0.0001, "down_intervals": 2}},  # any decoding breaks the ITL target
    })
    dep = Deployment(spec, health_interval_s=0.5)
    scaler = Autoscaler(dep, spec.autoscaling)  # stepped by hand: deterministic
    try:
        deltas: queue.SimpleQueue = queue.SimpleQueue()
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        for i in range(6):
            dep.submit(f"burst{i}", [5 + i, 6, 7, 8], params, deltas.put)
        got = {f"burst{i}": 0 for i in range(6)}
        while sum(got.values()) < 12:  # tokens are flowing
            d = deltas.get(timeout=60)
            got[d.request_id] += len(d.outputs[0].token_ids)
        assert scaler.step()["decode"] == 2 and dep.pools["decode"].size == 2
        for i in range(6, 10):  # the new replica takes new work
            dep.submit(f"burst{i}", [9 + i, 6, 7], params, deltas.put)
            got[f"burst{i}"] = 0
        finished = 0
        while finished < 10:
            d = deltas.get(timeout=120)
            assert not isinstance(d, BaseException), d
            got[d.request_id] += len(d.outputs[0].token_ids)
            finished += d.finished
        assert all(n == 40 for n in got.values()), got  # nothing lost or cut short
        time.sleep(2.5)  # a quiet interval (no latency samples)
        sizes = [scaler.step()["decode"] for _ in range(3)]
        assert sizes[-1] == 1 and dep.pools["decode"].retired  # drained and removed
        assert [e.after for e in scaler.events] == [2, 1]
        out = dep.pools["decode"].healthy()
        assert len(out) == 1
    finally:
        dep.shutdown()
