"""Deployment specs: the documented example parses; every invalid field is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecluster.cluster.spec import DeploymentSpec, SpecError

EXAMPLE = """
model: /models/deepseek-v3
prefill: {replicas: 1, ep: 8, device: cuda}
decode: {replicas: 2, ep: 8, device: cuda}
cache: {block_size: 64, memory_fraction: 0.9}
engine: {max_model_len: 131072, max_num_seqs: 256}
router: {host: 0.0.0.0, grpc_port: 50051, http_port: 8000, policy: cache_aware}
autoscaling:
  policy: slo
  decode: {min_replicas: 1, max_replicas: 4}
"""


def test_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(EXAMPLE)
    spec = DeploymentSpec.from_yaml(path)
    assert spec.served_name == "deepseek-v3" and not spec.colocated
    assert spec.decode.gpus_per_rank == 1 and set(spec.pools()) == {"prefill", "decode"}


def test_minimal_cpu_spec_is_colocated(tiny_checkpoint) -> None:
    spec = DeploymentSpec.parse({"model": str(tiny_checkpoint()), "decode": {"device": "cpu", "ep": 2}})
    spec.check_paths()
    assert spec.colocated and spec.decode.gpus_per_rank == 0 and spec.decode.replicas == 1


def test_engine_settings_reach_the_engine_config(tiny_checkpoint) -> None:
    from moecluster.cluster.deployment import engine_config

    spec = DeploymentSpec.parse({"model": str(tiny_checkpoint()), "decode": {"device": "cuda"},
                                 "engine": {"cuda_graph_max_batch": 0, "max_num_seqs": 32, "async_scheduling": False,
                                            "decode_experts_w8a8": False, "decode_linears_w8a8": False}})
    cfg = engine_config(spec, spec.decode)
    assert (cfg.cuda_graph_max_batch, cfg.max_num_seqs, cfg.kv_transfer) == (0, 32, "p2p")
    assert (cfg.async_scheduling, cfg.decode_experts_w8a8, cfg.decode_linears_w8a8) == (False, False, False)
    default = engine_config(DeploymentSpec.parse({"model": "/m"}), spec.decode)
    assert (default.cuda_graph_max_batch, default.async_scheduling, default.decode_experts_w8a8,
            default.decode_linears_w8a8) == (512, True, True, True)


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({}, "model", "required"),
        ({"model": "/m", "decode": {"ep": 0}}, "decode.ep", "greater than or equal to 1"),
        ({"model": "/m", "decode": {"replicas": 0}}, "decode.replicas", "at least 1"),
        ({"model": "/m", "decode": {"device": "tpu"}}, "decode.device", "cuda"),
        ({"model": "/m", "decode": {"device": "cpu", "gpus_per_rank": 1}}, "decode.gpus_per_rank", "must be 0"),
        ({"model": "/m", "prefill": {"device": "cpu"}, "decode": {"device": "cuda"}}, "prefill.device", "must match"),
        ({"model": "/m", "router": {"grpc_port": 8000, "http_port": 8000}}, "router.http_port", "must differ"),
        ({"model": "/m", "router": {"http_port": 70000}}, "router.http_port", "less than or equal to 65535"),
        ({"model": "/m", "router": {"policy": "random"}}, "router.policy", "round_robin"),
        ({"model": "/m", "cache": {"memory_fraction": 1.5}}, "cache.memory_fraction", "less than or equal to 1"),
        ({"model": "/m", "engine": {"dtype": "int8"}}, "engine.dtype", "auto"),
        ({"model": "/m", "engine": {"cuda_graph_max_batch": -1}}, "engine.cuda_graph_max_batch", "greater than or equal to 0"),
        ({"model": "/m", "decoder": {}}, "decoder", "not a known field"),
        ({"model": "/m", "autoscaling": {"policy": "not a path"}}, "autoscaling.policy", "class path"),
        ({"model": "/m", "autoscaling": {"decode": {"min_replicas": 3, "max_replicas": 2}}}, "autoscaling.decode.min_replicas", "exceeds"),
        ({"model": "/m", "decode": {"replicas": 5}, "autoscaling": {"decode": {"max_replicas": 4}}}, "decode.replicas", "outside"),
        ({"model": "/m", "autoscaling": {"prefill": {"max_replicas": 2}}}, "autoscaling.prefill", "no prefill pool"),
    ],
)
def test_invalid_specs_name_the_field(data: dict, field: str, reason: str) -> None:
    with pytest.raises(SpecError) as err:
        DeploymentSpec.parse(data)
    assert f"'{field}'" in str(err.value) and reason in str(err.value)


def test_yaml_problems(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        DeploymentSpec.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        DeploymentSpec.from_yaml(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="mapping"):
        DeploymentSpec.from_yaml(bad)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="'model'.*config.json"):
        DeploymentSpec.parse({"model": str(tmp_path)}).check_paths()


def test_router_tls_needs_both_files_and_key_env_is_a_name() -> None:
    from moecluster.cluster.spec import DeploymentSpec, SpecError

    with pytest.raises(SpecError, match="router.tls_key"):
        DeploymentSpec.parse({"model": "/m", "router": {"tls_cert": "/c.pem"}})
    with pytest.raises(SpecError, match="router.api_key_env"):
        DeploymentSpec.parse({"model": "/m", "router": {"api_key_env": "not a name"}})
    spec = DeploymentSpec.parse({"model": "/m", "router": {"api_key_env": "MOECLUSTER_KEY"}})
    assert spec.router.api_key_env == "MOECLUSTER_KEY"
