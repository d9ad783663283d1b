from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def local_ray():
    """One local CPU Ray cluster for the cluster tests (8 logical CPUs: one per rank actor)."""
    ray = pytest.importorskip("ray")
    from moecluster.cluster.replica import NAMESPACE

    ray.init(num_cpus=8, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    yield ray
    ray.shutdown()
