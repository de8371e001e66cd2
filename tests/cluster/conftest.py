"""Fixtures for the tests of the local Kubernetes test cluster (see docs/test-cluster.md)."""

from __future__ import annotations

import pytest

from imagebatch.testing.pytest_plugin import kube_cluster

__all__ = ["kube_cluster"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: needs a Kubernetes cluster (started locally if none is given)"
    )
