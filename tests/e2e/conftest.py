"""Fixtures of the end-to-end tests: CRDs from crds/, the operator under the chart's RBAC and
restricted test namespaces. The cluster (`kube_cluster`) and the S3 server (`s3`) come from
tests/conftest.py, so one session runs one of each."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import REPO, Operator, operator_kubeconfig

from imagebatch_testing.cluster import build_binaries, create_namespace
from imagebatch_testing.kubectl import Kubectl, install_crds
from imagebatch_testing.kueue import KueueController
from imagebatch_testing.kueuequeues import TestQueues, create_queues, delete_queues
from imagebatch_testing.pytest_plugin import TestCluster


@pytest.fixture(scope="session")
def kubectl(kube_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    """kubectl as the cluster admin, with the CRDs from crds/ installed and Established."""
    k = Kubectl(
        build_binaries() / "kubectl", kube_cluster.kubeconfig, tmp_path_factory.mktemp("kubectl-cache")
    )
    install_crds(k, REPO / "crds")
    return k


@pytest.fixture(scope="session")
def operator(
    kube_cluster: TestCluster, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    """The operator, running as the chart's ServiceAccount (a real token, the chart's ClusterRoles)."""
    work = tmp_path_factory.mktemp("operator")
    config = operator_kubeconfig(kube_cluster.client, kubectl, build_binaries() / "helm", work / "kubeconfig")
    op = Operator(config, work)
    op.start()
    yield op
    op.stop()


@pytest.fixture
def running_operator(operator: Operator) -> Operator:
    """The operator, restarted if an earlier test left it stopped."""
    if operator.proc is None or operator.proc.poll() is not None:
        operator.start()
    return operator


@pytest.fixture
def namespace(kube_cluster: TestCluster, kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace that enforces Pod Security `restricted`, deleted afterwards."""
    name = f"e2e-{request.node.name[5:25].replace('_', '-').strip('-').lower()}-{uuid.uuid4().hex[:5]}"
    create_namespace(
        kube_cluster.client,
        name,
        {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        },
    )
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def kueue_queues(kube_cluster: TestCluster, kueue: KueueController, namespace: str) -> Iterator[TestQueues]:
    """The real Kueue, and this test's queues: a ClusterQueue with quota for 500m cpu (one
    flavor, preempting lower priorities), its LocalQueue `queue` in the test's namespace."""
    queues = create_queues(kube_cluster.client, namespace, {"cpu": "500m"})
    yield queues
    delete_queues(kube_cluster.client, queues)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, attach the operator's log tail: the first thing anyone on call reads."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    op = item.funcargs.get("running_operator") if hasattr(item, "funcargs") else None
    if isinstance(op, Operator):
        for log in sorted(op.log_dir.glob("operator-*.log"))[-2:]:
            tail = log.read_text(errors="replace").splitlines()[-60:]
            report.sections.append((f"operator log {log.name} (last 60 lines)", "\n".join(tail)))
