"""pytest fixtures for tests that need a Kubernetes cluster.

Import the fixture into a conftest.py to use it:

    from imagebatch_testing.pytest_plugin import kube_cluster  # noqa: F401

`kueue` (session scope, started by the first test that asks for it) runs the real Kueue
controller against `kube_cluster` (imagebatch_testing.kueue), with the two WorkloadPriorityClasses
installed; each test makes its own queues with imagebatch_testing.kueuequeues.create_queues.

`kube_cluster` (session scope) starts a LocalCluster (hack/cluster/build.sh builds the binaries
when they are not cached; a missing toolchain makes the tests fail, not skip) and stops it at the
end. If IMAGEBATCH_TEST_KUBECONFIG names a kubeconfig, that cluster (kind, say) is used instead
and nothing is started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagebatch_testing.cluster import LocalCluster, build_binaries
from imagebatch_testing.kubeapi import KubeClient
from imagebatch_testing.kueue import KueueBuild, KueueController, build_kueue
from imagebatch_testing.kueuequeues import install_priority_classes
from imagebatch_testing.processes import ClusterError

EXTERNAL_KUBECONFIG_ENV = "IMAGEBATCH_TEST_KUBECONFIG"


@dataclass
class TestCluster:
    """A cluster for tests: its admin kubeconfig and client, and the LocalCluster if we run it."""

    __test__ = False  # not a test class, despite the name

    kubeconfig: Path
    client: KubeClient
    local: LocalCluster | None

    def pod_log(self, namespace: str, name: str) -> str:
        """A pod's output: the node agent's files locally, the API's log endpoint elsewhere."""
        if self.local is not None:
            return self.local.pod_log(namespace, name)
        status, text = self.client.get_raw(f"/api/v1/namespaces/{namespace}/pods/{name}/log")
        return text if status == 200 else f"(no log: HTTP {status})"

    def diagnostics(self, lines: int = 30) -> str:
        """Log tails of the local cluster's components (empty for an external cluster)."""
        return self.local.log_tails(lines) if self.local is not None else ""


@contextlib.contextmanager
def _alarm_paused() -> Iterator[None]:
    """Stops pytest-timeout's SIGALRM clock (signal method) while the binaries build.

    A cold build takes minutes and happens once (then the binaries are cached); it should not
    count against the first cluster test's timeout. CI had better run hack/cluster/build.sh first.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    remaining, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        yield
    finally:
        if remaining:
            signal.setitimer(signal.ITIMER_REAL, remaining, interval)


def start_test_cluster(state_dir: Path) -> Iterator[TestCluster]:
    """Yields a running cluster and stops it afterwards (a generator for fixtures to delegate to)."""
    external = os.environ.get(EXTERNAL_KUBECONFIG_ENV)
    if external:
        yield TestCluster(Path(external), KubeClient.from_kubeconfig(external), None)
        return
    with _alarm_paused():
        bin_dir = build_binaries()
    cluster = LocalCluster(state_dir, bin_dir=bin_dir)
    cluster.up()
    try:
        yield TestCluster(cluster.kubeconfig, cluster.client(), cluster)
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCluster]:
    """A running Kubernetes cluster for the whole test session (see the module docstring)."""
    yield from start_test_cluster(tmp_path_factory.mktemp("kube-cluster"))


@pytest.fixture(scope="session")
def kueue(kube_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KueueController]:
    """The Kueue controller (hack/kueue/build.sh) against the local cluster, for the rest of the
    session; it manages only Jobs with a kueue.x-k8s.io/queue-name label."""
    if kube_cluster.local is None:
        # Its API server cannot reach a webhook on this machine: use the Kueue installed there.
        crd = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/clusterqueues.kueue.x-k8s.io"
        if kube_cluster.client.get_or_none(crd) is None:
            raise ClusterError(
                f"the Kueue tests need Kueue (v0.17) in the cluster of {EXTERNAL_KUBECONFIG_ENV}: install "
                "its release manifests there, or unset the variable to run them on the local cluster"
            )
        install_priority_classes(kube_cluster.client)
        # Not started nor stopped here; it has no log on this machine (its Events are read instead).
        yield KueueController(KueueBuild(Path()), kube_cluster.kubeconfig, tmp_path_factory.mktemp("kueue"))
        return
    with _alarm_paused():
        build = build_kueue()
    controller = KueueController(
        build, kube_cluster.kubeconfig, tmp_path_factory.mktemp("kueue"), on_spawn=kube_cluster.local.record
    )
    controller.start()
    try:
        install_priority_classes(kube_cluster.client)
        yield controller
    finally:
        controller.stop()
