"""Fixtures of the Ray executor tests: one real multi-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: a head with no CPUs, so no actor lands there, and two worker nodes
of one logical CPU each), shared by the session. Its tests are skipped only when ray cannot be
imported (CI installs the `ray` extra: scripts/bootstrap)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.proc import ROOT


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    from ray.cluster_utils import Cluster

    # the raylets' workers import the fake pipeline from the repository, as the daemon does
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old
