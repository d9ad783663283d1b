"""The router's `Backend` over a Ray deployment: sampling dicts become SamplingParams, engine
outputs become the router's deltas, and the entry pool's ranks become placement views."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from moecluster.cluster.deployment import Deployment
from moecluster.router.requests.backend import ChoiceDelta, Delta, ModelInfo, ReplicaState, Sink, TokenLogprob
from moecluster.router.requests.placement import RankView, Target
from moecluster.workers.engine.outputs import RequestOutput
from moecluster.workers.engine.sampling_params import SamplingParams


def sampling_params(sampling: dict[str, Any]) -> SamplingParams:
    """Validate a request's sampling fields; the ValueError names the first bad field."""
    try:
        return SamplingParams(**sampling)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "sampling"
        reason = "is not a known sampling field" if err["type"] == "extra_forbidden" else err["msg"]
        raise ValueError(f"{where}: {reason.removeprefix('Value error, ')}") from None
    except TypeError as e:
        raise ValueError(f"sampling: {e}") from None


def to_delta(out: RequestOutput) -> Delta:
    choices = []
    for o in out.outputs:
        logprobs = None
        if o.logprobs is not None:
            logprobs = [[TokenLogprob(t, lp.logprob, lp.rank) for t, lp in entry.items()] for entry in o.logprobs]
        choices.append(ChoiceDelta(o.index, o.text, list(o.token_ids), logprobs, o.finish_reason, o.stop_reason))
    return Delta(out.request_id, choices, out.finished)


class DeploymentBackend:
    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        spec = deployment.spec
        config = json.loads((spec.model / "config.json").read_text())
        limits = min(deployment.limits, key=lambda lim: lim.max_model_len)
        self.model = ModelInfo(spec.served_name or spec.model.name, str(spec.model), limits.max_model_len,
                               spec.cache.block_size, str(config.get("model_type", "")))

    def submit(
        self, request_id: str, prompt_ids: list[int], sampling: dict[str, Any], sink: Sink,
        prompt: str | None = None, target: Target | None = None,
    ) -> None:
        params = sampling_params(sampling)

        def relay(item: RequestOutput | BaseException) -> None:
            sink(item if isinstance(item, BaseException) else to_delta(item))

        self.deployment.submit(request_id, prompt_ids, params, relay, prompt, target)

    def abort(self, request_id: str) -> bool:
        return self.deployment.abort(request_id)

    def rank_views(self) -> list[RankView]:
        return self.deployment.rank_views()

    def status(self) -> tuple[list[ReplicaState], int, int]:
        replicas = []
        for pool in self.deployment.pools.values():
            for i, r in enumerate(pool.replicas):
                ranks = []
                for h in r.health() if r is not None else []:
                    s = h.get("stats")
                    ranks.append({
                        "rank": h["rank"], "alive": h["alive"],
                        "running": s.num_running if s else 0, "waiting": s.num_waiting if s else 0,
                        "kv_usage": s.kv_usage if s else 0.0, "free_blocks": s.num_free_blocks if s else 0,
                        "total_blocks": s.num_blocks if s else 0, "prefix_hit_rate": s.prefix_hit_rate if s else 0.0,
                    })
                replicas.append(ReplicaState(f"{pool.name}-{i}", pool.role, r is not None and r.healthy,
                                             r.streams.open_requests() if r is not None else 0, ranks))
        return replicas, self.deployment.num_open(), self.deployment.failovers
