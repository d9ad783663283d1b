"""The Helm chart (helm/moecluster): lint, render, validate every object, check what matters.

Renders the defaults, both presets and configurations with every optional feature on; every
object is validated (core kinds by kubernetes-validate, the RayCluster by KubeRay's CRD schema,
the ServiceMonitor by assertions), and the generated deployment spec must parse with
`DeploymentSpec` and say what the values say. Bad value combinations must fail, naming the value.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from moecluster.cluster.spec import DeploymentSpec
from tests.helm.chart_tools import CHART, FULLNAME, NAMESPACE, RELEASE, HelmFailed

DS_PRESET = "values-deepseek-v3-fp8-2x8h100.yaml"
KIMI_PRESET = "values-kimi-k2-thinking-int4-8xh200.yaml"
SERVE = "moecluster serve --spec /etc/moecluster/spec.yaml --address auto"

# Everything optional on at once: prefill pool, both autoscalers, ServiceMonitor, NetworkPolicy,
# API key, HF token and TLS secrets, a created PVC with the download, non-default ports.
EVERYTHING = {
    "prefill": {"enabled": True, "replicas": 2, "ep": 4, "gpusPerPod": 8, "minReplicas": 2, "maxReplicas": 4,
                "nodeSelector": {"pool": "prefill"}},
    "decode": {"replicas": 2, "ep": 16, "gpusPerPod": 8, "minReplicas": 1, "maxReplicas": 3,
               "resources": {"extra": {"rdma/ib": 8}}, "affinity": {"nodeAffinity": {
                   "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                       {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]}]}}}},
    "autoscaling": {"enabled": True, "enableInTreeAutoscaling": True, "policy": "my_pkg.policies:Custom"},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "networkPolicy": {"enabled": True, "apiFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
                      "dashboardFrom": [{"podSelector": {"matchLabels": {"role": "admin"}}}]},
    "router": {"grpcPort": 9000, "httpPort": 9001, "metricsPort": 9002, "policy": "session",
               "apiKey": {"secretName": "router-key", "env": "ROUTER_KEY"}, "tls": {"secretName": "router-tls"},
               "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]}},
    "model": {"trustRemoteCode": True, "download": {"hfToken": {"secretName": "hf"}}},
    "ray": {"upgradeStrategy": "Recreate", "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]},
    "head": {"readinessProbe": {"httpGet": {"path": "/health", "port": "http", "scheme": "HTTPS"}}},
    "engine": {"maxModelLen": None, "eplbIntervalSteps": 1000, "eplbRedundantSlots": 32, "kvTransfer": "object_store",
               "cudaGraphMaxBatch": 0, "asyncScheduling": False,
               "decodeExpertsW8a8": False, "decodeLinearsW8a8": False},
}
EXISTING_CLAIM = {"model": {"volume": {"existingClaim": "weights", "subPath": "deepseek-v3",
                                       "create": {"enabled": False}}, "download": {"enabled": False}}}
OWN_DOWNLOAD = {"model": {"download": {"repo": "",
                                       "command": ["/bin/sh", "-c", "aws s3 sync s3://b/ds /models/deepseek-v3"]}}}

CONFIGS = {
    "defaults": ({}, ()),
    "deepseek-2x8h100": ({}, (DS_PRESET,)),
    "kimi-8xh200": ({}, (KIMI_PRESET,)),
    "everything": (EVERYTHING, ()),
    "deepseek-everything": (EVERYTHING, (DS_PRESET,)),
    "existing-claim": (EXISTING_CLAIM, ()),
    "own-download": (OWN_DOWNLOAD, ()),
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def effective_values(name: str) -> dict:
    overrides, files = CONFIGS[name]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        values = _merge(values, yaml.safe_load((CHART / f).read_text()))
    return _merge(values, overrides)


@pytest.fixture(params=list(CONFIGS), scope="module")
def case(request, render):
    overrides, files = CONFIGS[request.param]
    return request.param, effective_values(request.param), render(overrides, *files)


def of_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def groups(objs: list[dict]) -> tuple[dict, dict[str, dict]]:
    rc = one(objs, "RayCluster")
    return rc["spec"]["headGroupSpec"], {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}


def container(template: dict, name: str) -> dict:
    return next(c for c in template["spec"]["containers"] if c["name"] == name)


def spec_of(objs: list[dict]) -> DeploymentSpec:
    cm = one(objs, "ConfigMap", f"{FULLNAME}-spec")
    return DeploymentSpec.parse(yaml.safe_load(cm["data"]["spec.yaml"]))


def pools(values: dict) -> dict[str, dict]:
    return {"decode": values["decode"]} | ({"prefill": values["prefill"]} if values["prefill"]["enabled"] else {})


# ---- lint ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("files", [(), (DS_PRESET,), (KIMI_PRESET,)], ids=["defaults", "deepseek", "kimi"])
def test_helm_lint(run_helm, files):
    args = ["lint", "--strict", str(CHART)]
    for f in files:
        args += ["--values", str(CHART / f)]
    out = run_helm(*args)
    assert "0 chart(s) failed" in out


# ---- every rendered object is valid -------------------------------------------------------------

def test_every_object_validates(case, validate_object):
    _, _, objs = case
    kinds = {o["kind"] for o in objs}
    assert {"RayCluster", "ConfigMap", "Service", "ServiceAccount"} <= kinds
    for obj in objs:
        validate_object(obj)
        assert obj["metadata"].get("namespace") in (None, NAMESPACE)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_optional_objects_follow_the_values(case):
    name, values, objs = case
    kinds = [o["kind"] for o in objs]
    assert ("ServiceMonitor" in kinds) == values["serviceMonitor"]["enabled"]
    assert ("NetworkPolicy" in kinds) == values["networkPolicy"]["enabled"]
    assert ("PersistentVolumeClaim" in kinds) == values["model"]["volume"]["create"]["enabled"]
    in_tree = values["autoscaling"]["enableInTreeAutoscaling"]
    assert ("Role" in kinds) == in_tree and ("RoleBinding" in kinds) == in_tree
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    _, workers = groups(objs)
    assert set(workers) == set(pools(values))
    pdbs = {p["spec"]["selector"]["matchLabels"]["ray.io/group"] for p in of_kind(objs, "PodDisruptionBudget")}
    assert pdbs == set(pools(values))


# ---- GPU pods, head pod -------------------------------------------------------------------------

def test_worker_groups_gpus_shm_and_replicas(case):
    _, values, objs = case
    _, workers = groups(objs)
    for name, pool in pools(values).items():
        g = workers[name]
        gpp, ep = pool["gpusPerPod"], pool["ep"]
        pods = lambda n: n * ep // gpp  # noqa: E731
        lo = pool["minReplicas"] if pool["minReplicas"] is not None else pool["replicas"]
        hi = pool["maxReplicas"] if pool["maxReplicas"] is not None else pool["replicas"]
        assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == (pods(pool["replicas"]), pods(lo), pods(hi))
        assert g["rayStartParams"]["num-gpus"] == str(gpp)
        spec = g["template"]["spec"]
        c = container(g["template"], "ray-worker")
        res = c["resources"]
        assert res["requests"] == res["limits"], f"{name}: requests must equal limits"
        assert res["limits"]["nvidia.com/gpu"] == str(gpp)
        assert {"cpu", "memory"} <= set(res["limits"])
        for k, v in pool["resources"]["extra"].items():
            assert res["limits"][k] == str(v)
        shm = next(v for v in spec["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": pool["shmSize"]}
        assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        model = next(m for m in c["volumeMounts"] if m["name"] == "model")
        assert model["mountPath"] == values["model"]["path"] and model["readOnly"] is True
        assert next(v for v in spec["volumes"] if v["name"] == "model")["persistentVolumeClaim"]["readOnly"] is True
        assert spec.get("nodeSelector", {}) == pool["nodeSelector"]
        assert spec.get("tolerations", []) == pool["tolerations"]
        assert spec.get("affinity", {}) == pool["affinity"]
        assert "$KUBERAY_GEN_RAY_START_CMD" in c["args"][0]


def test_head_has_no_gpu_and_runs_the_router(case):
    _, values, objs = case
    rc = one(objs, "RayCluster")
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head, _ = groups(objs)
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    spec = head["template"]["spec"]
    for c in spec["containers"] + spec.get("initContainers", []):
        for part in ("requests", "limits"):
            assert not any("gpu" in k for k in c["resources"].get(part, {})), f"{c['name']} asks for a GPU"
        assert c["resources"]["requests"] == c["resources"]["limits"]
    c = container(head["template"], "ray-head")
    assert SERVE in c["args"][0]
    assert "KUBERAY_GEN_RAY_START_CMD/--block/" in c["args"][0]  # Ray's head starts in the background
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["spec"]["mountPath"] == "/etc/moecluster" and mounts["spec"]["readOnly"]
    assert mounts["model"]["readOnly"] is True and mounts["model"]["mountPath"] == values["model"]["path"]
    assert mounts["shm"]["mountPath"] == "/dev/shm"
    cm = next(v for v in spec["volumes"] if v["name"] == "spec")
    assert cm["configMap"]["name"] == f"{FULLNAME}-spec"
    assert spec["serviceAccountName"] == FULLNAME
    assert spec["automountServiceAccountToken"] is values["autoscaling"]["enableInTreeAutoscaling"]


def test_model_volume_and_download(case):
    _, values, objs = case
    head, workers = groups(objs)
    vol, dl = values["model"]["volume"], values["model"]["download"]
    claim = vol["existingClaim"] or f"{FULLNAME}-model"
    for t in [head["template"]] + [g["template"] for g in workers.values()]:
        v = next(v for v in t["spec"]["volumes"] if v["name"] == "model")
        assert v["persistentVolumeClaim"]["claimName"] == claim
        for c in t["spec"]["containers"] + t["spec"].get("initContainers", []):
            for m in c.get("volumeMounts", []):
                if m["name"] == "model":
                    assert m.get("subPath", "") == vol["subPath"]
    if vol["create"]["enabled"]:
        pvc = one(objs, "PersistentVolumeClaim", claim)
        assert pvc["spec"]["accessModes"] == vol["create"]["accessModes"]
        assert pvc["spec"]["resources"]["requests"]["storage"] == vol["create"]["size"]
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    inits = head["template"]["spec"].get("initContainers", [])
    assert [c["name"] for c in inits] == (["download-model"] if dl["enabled"] else [])
    for g in workers.values():
        assert not g["template"]["spec"].get("initContainers")  # the head downloads, once
    if dl["enabled"]:
        init = inits[0]
        assert next(m for m in init["volumeMounts"] if m["name"] == "model")["readOnly"] is False
        if dl["command"]:
            assert init["command"] == dl["command"]
        else:
            assert "huggingface-cli download" in init["args"][0]
            env = {e["name"]: e for e in init["env"]}
            assert env["HF_REPO"]["value"] == dl["repo"] and env["MODEL_PATH"]["value"] == values["model"]["path"]


# ---- the generated spec -------------------------------------------------------------------------

def test_generated_spec_parses_and_matches_the_values(case):
    _, values, objs = case
    spec = spec_of(objs)
    assert str(spec.model) == values["model"]["path"]
    assert spec.served_name == (values["model"]["servedName"] or Path(values["model"]["path"]).name)
    assert spec.trust_remote_code is values["model"]["trustRemoteCode"]
    want = pools(values)
    assert set(spec.pools()) == set(want)
    for name, pool in want.items():
        got = spec.pools()[name]
        assert (got.replicas, got.ep, got.device, got.gpus_per_rank) == (pool["replicas"], pool["ep"], "cuda", 1)
    r = values["router"]
    assert (spec.router.host, spec.router.grpc_port, spec.router.http_port, spec.router.metrics_port) == (
        "0.0.0.0", r["grpcPort"], r["httpPort"], r["metricsPort"])
    assert (spec.router.policy, spec.router.max_queue) == (r["policy"], r["maxQueue"])
    assert spec.router.api_key_env == (r["apiKey"]["env"] if r["apiKey"]["secretName"] else None)
    assert (spec.router.tls_cert is None) == (not r["tls"]["secretName"])
    c, e = values["cache"], values["engine"]
    assert (spec.cache.block_size, spec.cache.memory_fraction, spec.cache.num_blocks) == (
        c["blockSize"], c["memoryFraction"], c["numBlocks"])
    assert (spec.engine.max_model_len, spec.engine.max_num_seqs, spec.engine.eplb_interval_steps) == (
        e["maxModelLen"], e["maxNumSeqs"], e["eplbIntervalSteps"])
    assert spec.engine.kv_transfer == e["kvTransfer"]
    assert spec.engine.cuda_graph_max_batch == e["cudaGraphMaxBatch"]
    assert spec.engine.async_scheduling == e["asyncScheduling"]
    assert spec.engine.decode_experts_w8a8 == e["decodeExpertsW8a8"]
    assert spec.engine.decode_linears_w8a8 == e["decodeLinearsW8a8"]
    a = values["autoscaling"]
    assert (spec.autoscaling is not None) == a["enabled"]
    if a["enabled"]:
        assert spec.autoscaling.policy == a["policy"]
        for name, pool in want.items():
            bounds = getattr(spec.autoscaling, name)
            assert (bounds.min_replicas, bounds.max_replicas) == (pool["minReplicas"], pool["maxReplicas"])


# ---- Services and ports -------------------------------------------------------------------------

def test_service_ports_match_the_spec_and_the_head_container(case):
    _, values, objs = case
    spec = spec_of(objs)
    head, _ = groups(objs)
    ports = {p["name"]: p["containerPort"] for p in container(head["template"], "ray-head")["ports"]}
    assert ports["grpc"] == spec.router.grpc_port
    assert ports["http"] == spec.router.http_port
    assert ports["router-metrics"] == spec.router.metrics_port
    assert ports["metrics"] == values["ray"]["metricsExportPort"]
    selector = {"ray.io/cluster": FULLNAME, "ray.io/node-type": "head"}
    assert one(objs, "RayCluster")["metadata"]["name"] == FULLNAME

    api = one(objs, "Service", FULLNAME)
    assert api["spec"]["selector"] == selector
    assert api["spec"]["type"] == values["router"]["service"]["type"]
    by_name = {p["name"]: p for p in api["spec"]["ports"]}
    assert set(by_name) == {"grpc", "http"}
    assert by_name["grpc"]["port"] == spec.router.grpc_port and by_name["grpc"]["targetPort"] == "grpc"
    assert by_name["http"]["port"] == spec.router.http_port and by_name["http"]["targetPort"] == "http"

    metrics = one(objs, "Service", f"{FULLNAME}-metrics")
    assert metrics["spec"]["selector"] == selector
    by_name = {p["name"]: p for p in metrics["spec"]["ports"]}
    assert by_name["router-metrics"]["port"] == spec.router.metrics_port
    assert ports[by_name["router-metrics"]["targetPort"]] == spec.router.metrics_port
    assert ports[by_name["http-metrics"]["targetPort"]] == spec.router.http_port

    ray = one(objs, "Service", f"{FULLNAME}-ray-metrics")
    assert ray["spec"]["clusterIP"] == "None" and ray["spec"]["selector"] == {"ray.io/cluster": FULLNAME}
    assert ray["spec"]["ports"][0]["targetPort"] == "metrics"


def test_service_monitor_structure(render):
    objs = render(EVERYTHING)
    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selected = [s for s in of_kind(objs, "Service")
                if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in selected} == {f"{FULLNAME}-metrics", f"{FULLNAME}-ray-metrics"}
    port_names = {p["name"] for s in selected for p in s["spec"]["ports"]}
    assert sm["spec"]["endpoints"], "no endpoints"
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names, f"ServiceMonitor endpoint port {ep['port']} is on no selected Service"
        assert ep["path"].startswith("/")
        assert re.fullmatch(r"\d+(ms|s|m|h)", ep["interval"]) and re.fullmatch(r"\d+(ms|s|m|h)", ep["scrapeTimeout"])
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "tlsConfig", "relabelings",
                           "metricRelabelings", "honorLabels", "bearerTokenSecret", "authorization"}
    http = next(ep for ep in sm["spec"]["endpoints"] if ep["port"] == "http-metrics")
    assert http["scheme"] == "https"  # router.tls is on in EVERYTHING


def test_network_policy(render):
    objs = render(EVERYTHING)
    np = one(objs, "NetworkPolicy")
    assert np["spec"]["podSelector"] == {"matchLabels": {"ray.io/cluster": FULLNAME}}
    rules = np["spec"]["ingress"]
    assert {"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": FULLNAME}}}]} in rules  # Ray + NCCL
    api = next(r for r in rules if {"port": 9000, "protocol": "TCP"} in r.get("ports", []))
    assert {"port": 9001, "protocol": "TCP"} in api["ports"]
    assert api["from"] == EVERYTHING["networkPolicy"]["apiFrom"]
    dash = next(r for r in rules if {"port": 8265, "protocol": "TCP"} in r.get("ports", []))
    assert dash["from"] == EVERYTHING["networkPolicy"]["dashboardFrom"]


def test_pod_disruption_budgets_select_the_worker_pods(render):
    objs = render(EVERYTHING)
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert sel["ray.io/cluster"] == FULLNAME and sel["ray.io/group"] in ("decode", "prefill")
        assert pdb["spec"]["maxUnavailable"] == 1


# ---- RBAC, secrets, security --------------------------------------------------------------------

def test_rbac_only_for_the_in_tree_autoscaler(render):
    assert not of_kind(render({}), "Role")
    objs = render(EVERYTHING)
    rc = one(objs, "RayCluster")
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    opts = rc["spec"]["autoscalerOptions"]
    assert opts["resources"]["requests"] == opts["resources"]["limits"]
    rules = one(objs, "Role")["rules"]
    granted = {(res, verb) for r in rules for res in r["resources"] for verb in r["verbs"]}
    assert {("pods", "list"), ("pods", "patch"), ("rayclusters", "get"), ("rayclusters", "patch")} <= granted
    assert not any("secrets" in r["resources"] or "*" in r["verbs"] for r in rules)
    binding = one(objs, "RoleBinding")
    assert binding["roleRef"]["name"] == one(objs, "Role")["metadata"]["name"]
    head, workers = groups(objs)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": head["template"]["spec"]["serviceAccountName"],
                                    "namespace": NAMESPACE}]
    assert all(g["template"]["spec"]["automountServiceAccountToken"] is False for g in workers.values())


def test_secrets_are_only_referenced(case):
    _, values, objs = case
    assert not of_kind(objs, "Secret")
    head, workers = groups(objs)
    templates = [head["template"]] + [g["template"] for g in workers.values()]
    envs = {e["name"]: e for t in templates for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])
            for e in c.get("env", [])}
    for name, e in envs.items():
        if re.search(r"KEY|TOKEN|SECRET|PASSWORD", name):
            assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{name} must come from a Secret"
    key = values["router"]["apiKey"]
    if key["secretName"]:
        ref = envs[key["env"]]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (key["secretName"], key["secretKey"])
        assert envs["MOECLUSTER_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == key["secretName"]
    else:
        assert key["env"] not in envs
    hf = values["model"]["download"]["hfToken"]
    assert ("HF_TOKEN" in envs) == bool(hf["secretName"] and values["model"]["download"]["enabled"])
    tls = values["router"]["tls"]["secretName"]
    tls_volumes = [v for v in head["template"]["spec"]["volumes"] if "secret" in v]
    assert [v["secret"]["secretName"] for v in tls_volumes] == ([tls] if tls else [])
    if tls:
        spec = spec_of(objs)
        mount = next(m for m in container(head["template"], "ray-head")["volumeMounts"] if m["name"] == "tls")
        assert str(spec.router.tls_cert.parent) == str(spec.router.tls_key.parent) == mount["mountPath"]
        assert (spec.router.tls_cert.name, spec.router.tls_key.name) == ("tls.crt", "tls.key")  # kubernetes.io/tls keys


def test_security_contexts_are_non_root(case):
    _, _, objs = case
    head, workers = groups(objs)
    for t in [head["template"]] + [g["template"] for g in workers.values()]:
        pod = t["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0 and pod["fsGroup"] > 0
        for c in t["spec"]["containers"] + t["spec"].get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged")
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
    opts = one(objs, "RayCluster")["spec"].get("autoscalerOptions")
    if opts:
        assert opts["securityContext"]["allowPrivilegeEscalation"] is False
        assert opts["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_notes_tell_how_to_reach_the_api(run_helm):
    out = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                   "--set", "router.apiKey.secretName=router-key")
    notes = out[out.index("NOTES:"):]
    assert f"port-forward svc/{FULLNAME} 8000:8000 50051:50051" in notes
    assert "moecluster status --url 127.0.0.1:50051" in notes and "-- moecluster status" in notes
    assert "secret router-key" in notes and 'Authorization: Bearer $MOECLUSTER_API_KEY' in notes
    assert f"port-forward svc/{FULLNAME}-head-svc 8265:8265" in notes


# ---- presets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, model, gpu, nodes", [
    (DS_PRESET, "deepseek-v3", "h100", 2),
    (KIMI_PRESET, "kimi-k2-thinking", "h200", 1),
])
def test_presets_fit_per_moecluster_plan(preset, model, gpu, nodes):
    """The preset's decode layout holds its weights and at least one max-length sequence per GPU,
    with the cache sized as the engine sizes it under the preset's memory fraction and batch."""
    from moecluster.cluster.plan.memory import PlanConfig
    from moecluster.cluster.plan.planner import make_plan

    values = _merge(yaml.safe_load((CHART / "values.yaml").read_text()), yaml.safe_load((CHART / preset).read_text()))
    d = values["decode"]
    assert d["replicas"] * d["ep"] == nodes * d["gpusPerPod"] == nodes * 8
    engine = values["engine"]  # the plan sizes the cache as the engine will with these settings
    plan = make_plan(model, PlanConfig(gpu=gpu, nodes=nodes, ep=d["ep"], context=engine["maxModelLen"],
                                       max_batched_tokens=engine["maxNumBatchedTokens"],
                                       memory_fraction=values["cache"]["memoryFraction"]))
    assert plan.rank.fits and plan.rank.seqs_per_gpu >= 1, plan.verdict


# ---- documentation ------------------------------------------------------------------------------

def test_values_are_documented_helm_docs_style():
    """Every value carries a `# --` comment (on itself, or on the map that holds it), and the
    README's values table lists every documented key."""
    text = (CHART / "values.yaml").read_text()
    documented, stack, pending = [], [], False
    for line in text.splitlines():
        if re.match(r"^\s*# -- ", line):
            pending = True
            continue
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if m:
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            if pending:
                documented.append(".".join(k for _, k in stack))
            pending = False
        elif line.strip() and not line.lstrip().startswith(("#", "-")):
            pending = False

    def keys(d: dict, prefix: str = ""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict) and v:
                yield from keys(v, f"{prefix}{k}.")

    undocumented = [k for k in keys(yaml.safe_load(text))
                    if not any(k == d or k.startswith(d + ".") or d.startswith(k + ".") for d in documented)]
    assert not undocumented, f"values without a `# --` comment: {undocumented}"
    readme = (CHART / "README.md").read_text()
    missing = [d for d in documented if f"`{d}`" not in readme]
    assert not missing, f"README.md values table lacks: {missing}"


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (CHART.parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert chart["apiVersion"] == "v2" and chart["appVersion"] == version


# ---- bad values fail, naming the value ----------------------------------------------------------

BAD = [
    ({"decode": {"ep": 6}}, "decode.ep"),                     # 6 ranks don't fill pods of 8 whole
    ({"decode": {"ep": 12}}, "decode.ep"),                    # > 8 ranks must span whole pods
    ({"decode": {"ep": 4, "replicas": 3}}, "decode.replicas"),  # 12 GPUs = 1.5 pods
    ({"decode": {"ep": 4, "replicas": 2, "maxReplicas": 3}}, "decode.maxReplicas"),
    ({"decode": {"replicas": 2, "minReplicas": 3}}, "decode.minReplicas"),
    ({"decode": {"replicas": 2, "maxReplicas": 1}}, "decode.maxReplicas"),
    ({"prefill": {"enabled": True, "ep": 3}}, "prefill.ep"),
    ({"router": {"httpPort": 50051}}, "router.httpPort"),
    ({"router": {"grpcPort": 6379}}, "router.grpcPort"),
    ({"router": {"metricsPort": 52365}}, "router.metricsPort"),          # Ray's dashboard agent
    ({"ray": {"dashboardPort": 8080}}, "ray.metricsExportPort"),         # the same port twice
    ({"ray": {"metricsExportPort": 10001}}, "ray.metricsExportPort"),
    ({"decode": {"resources": {"cpu": "4"}}}, "decode.resources.cpu"),  # 8 bundles of {GPU: 1, CPU: 1}
    ({"decode": {"resources": {"cpu": "7"}, "ep": 8}}, "give at least 8"),
    ({"decode": {"rayStartParams": {"num-cpus": 2}}}, "decode.rayStartParams.num-cpus"),
    ({"prefill": {"enabled": True, "resources": {"cpu": "3500m"}}}, "prefill.resources.cpu"),
    ({"model": {"volume": {"create": {"enabled": False}}}}, "model.volume"),
    ({"model": {"volume": {"existingClaim": "w"}}}, "model.volume"),
    ({"model": {"volume": {"create": {"accessModes": ["ReadWriteOnce"]}}}}, "model.volume.create.accessModes"),
    ({"model": {"download": {"repo": ""}}}, "model.download"),
    ({"autoscaling": {"enabled": True}, "decode": {"maxReplicas": 2}}, "autoscaling.enableInTreeAutoscaling"),
    # values.schema.json
    ({"decode": {"gpuPerPod": 4}}, "gpuPerPod"),
    ({"decode": {"ep": 0}}, "/decode/ep"),
    ({"router": {"policy": "fastest"}}, "/router/policy"),
    ({"engine": {"dtype": "int8"}}, "/engine/dtype"),
    ({"engine": {"kvTransfer": "nixl"}}, "/engine/kvTransfer"),
    ({"engine": {"cudaGraphMaxBatch": -1}}, "/engine/cudaGraphMaxBatch"),
    ({"model": {"path": "models/ds"}}, "/model/path"),
    ({"router": {"apiKey": {"env": "not-an-env"}}}, "/router/apiKey/env"),
]


@pytest.mark.parametrize("values, names", BAD, ids=[n for _, n in BAD])
def test_bad_values_fail_naming_the_value(render, values, names):
    with pytest.raises(HelmFailed) as err:
        render(values)
    assert names in err.value.output, err.value.output


# ---- probes, shutdown, CPUs per rank ------------------------------------------------------------

def _probes(c: dict) -> dict:
    return {k: c[k] for k in ("livenessProbe", "readinessProbe") if k in c}


def test_ray_probes_follow_non_default_ray_ports(render, validate_object):
    """KubeRay's injected probes ask 8265 (dashboard) and 52365 (dashboard agent) whatever the
    rayStartParams say: with other ports the head's liveness probe would fail and restart it
    forever. The chart then writes the same checks against the configured ports."""
    head, workers = groups(render({}))
    assert not _probes(container(head["template"], "ray-head"))  # defaults: KubeRay's probes
    assert not _probes(container(workers["decode"]["template"], "ray-worker"))

    objs = render({"ray": {"dashboardPort": 8300}, "head": {"rayStartParams": {"dashboard-agent-listen-port": 52400}},
                   "decode": {"rayStartParams": {"dashboard-agent-listen-port": 52401}}})
    for obj in objs:
        validate_object(obj)
    head, workers = groups(objs)
    assert head["rayStartParams"]["dashboard-port"] == "8300"
    probes = _probes(container(head["template"], "ray-head"))
    assert set(probes) == {"livenessProbe", "readinessProbe"}
    for probe in probes.values():
        cmd = probe["exec"]["command"][-1]
        assert "localhost:8300/api/gcs_healthz" in cmd and "localhost:52400/api/local_raylet_healthz" in cmd
        assert "8265" not in cmd and "52365" not in cmd
    for probe in _probes(container(workers["decode"]["template"], "ray-worker")).values():
        assert probe["exec"]["command"][-1].count("localhost:52401/api/local_raylet_healthz") == 1

    given = {"httpGet": {"path": "/health", "port": "http"}}
    head, _ = groups(render({"ray": {"dashboardPort": 8300}, "head": {"readinessProbe": given}}))
    probes = _probes(container(head["template"], "ray-head"))
    assert probes["readinessProbe"] == given and "8300" in probes["livenessProbe"]["exec"]["command"][-1]


def test_graceful_shutdown(case):
    _, values, objs = case
    head, workers = groups(objs)
    # serve's stop: the router (HTTP requests get up to 60 s), the autoscaler, the deployment, then Ray.
    assert head["template"]["spec"]["terminationGracePeriodSeconds"] == values["head"]["terminationGracePeriodSeconds"]
    assert values["head"]["terminationGracePeriodSeconds"] >= 60
    for g in workers.values():
        assert "ray stop" in container(g["template"], "ray-worker")["lifecycle"]["preStop"]["exec"]["command"][-1]


def test_cpus_per_rank_accept_millicores(render):
    _, workers = groups(render({"decode": {"resources": {"cpu": "7500m"}}}))  # Ray rounds 7.5 up to 8
    assert container(workers["decode"]["template"], "ray-worker")["resources"]["limits"]["cpu"] == "7500m"
    groups(render({"decode": {"resources": {"cpu": "4"}, "rayStartParams": {"num-cpus": 8}}}))


def test_notes_with_tls_do_not_promise_a_plaintext_status(run_helm):
    out = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                   "--set", "router.tls.secretName=router-tls")
    notes = out[out.index("NOTES:"):]
    assert "moecluster status --url" not in notes and "-- moecluster status" not in notes
    assert "grpcurl -insecure 127.0.0.1:50051 moecluster.v1.Generation/ClusterStatus" in notes
