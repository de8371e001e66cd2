"""The control-plane tests use `kube_cluster` (imagebatch_testing.pytest_plugin), which tests/conftest.py
imports for every test layer so that one session runs one cluster (see docs/test-cluster.md)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: needs a Kubernetes cluster (started locally if none is given)"
    )
