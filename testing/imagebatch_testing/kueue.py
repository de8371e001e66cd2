"""Kueue (sigs.k8s.io/kueue) for the local test cluster: the real controller, run as a process.

hack/kueue/build.sh builds the controller from its Go module and keeps the CRDs and webhook
manifests of the same version (cached by version). `KueueController.start()` installs the CRDs,
starts the controller against the cluster's API server (leader election off, only the batch/job
integration, only Jobs with a `kueue.x-k8s.io/queue-name` label managed) and installs its webhook
configurations with `clientConfig.url: https://127.0.0.1:<port>/...` and a CA of its own (Kueue's
internal cert management wants a Service in front of the webhook, which a cluster without pod
networking cannot have). Ready means: readyz answers and the Job webhook has defaulted a dry-run
Job. See docs/test-cluster.md.

The queue objects a test needs (ResourceFlavor, ClusterQueue, LocalQueue, WorkloadPriorityClass)
are built by the pure functions at the end.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imagebatch_testing.binaries import REPO_ROOT
from imagebatch_testing.certs import CertificateAuthority
from imagebatch_testing.kubeapi import ApiError, KubeClient
from imagebatch_testing.processes import (
    ClusterError,
    ProcessRecord,
    free_port,
    process_alive,
    spawn,
    stop_process_group,
    tail,
    wait_healthy,
    wait_until,
)

JSON = dict[str, Any]
BUILD_SCRIPT = REPO_ROOT / "hack" / "kueue" / "build.sh"
GROUP = "kueue.x-k8s.io"
API = f"{GROUP}/v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
MUTATING_CONFIG = "kueue-mutating-webhook-configuration"
VALIDATING_CONFIG = "kueue-validating-webhook-configuration"
# The CRDs whose versions Kueue's /convert webhook converts (config/components/crd/kustomization.yaml).
CONVERTED_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
# Webhooks of the API groups Kueue serves with only batch/job enabled; the others (pods,
# deployments, ...) answer with no-ops and would only make every pod creation depend on Kueue.
SERVED_GROUPS = {GROUP, "batch"}
# With internalCertManagement off, Kueue reads its metrics certificate from this fixed path
# (cmd/kueue/main.go); the controller sees it through an overlay of /etc in its own mount namespace.
METRICS_CERT_DIR = "etc/kueue/metrics/certs"
FIELD_MANAGER = "imagebatch-tests"
# The two WorkloadPriorityClasses every test may use (kueue.x-k8s.io/priority-class: <name>).
LOW_PRIORITY = "imagebatch-test-low"
HIGH_PRIORITY = "imagebatch-test-high"
PRIORITY_VALUES = {LOW_PRIORITY: 100, HIGH_PRIORITY: 1000}


@dataclass(frozen=True)
class KueueBuild:
    """What hack/kueue/build.sh leaves in its versioned folder."""

    dir: Path

    @property
    def binary(self) -> Path:
        return self.dir / "kueue"

    @property
    def crds(self) -> list[Path]:
        return sorted((self.dir / "crds").glob("*.yaml"))

    @property
    def webhook_manifests(self) -> Path:
        return self.dir / "webhook-manifests.yaml"


def build_kueue(timeout: float = 3600) -> KueueBuild:
    """Runs hack/kueue/build.sh (cached, so quick when nothing is missing)."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, timeout=timeout, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ClusterError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
    build = KueueBuild(Path(lines[-1]))
    if not os.access(build.binary, os.X_OK) or not build.crds or not build.webhook_manifests.exists():
        raise ClusterError(
            f"{BUILD_SCRIPT} did not produce the kueue binary, CRDs and webhooks in {build.dir}"
        )
    return build


# -- what the controller is started with (pure) ------------------------------------------------------


@dataclass(frozen=True)
class KueuePorts:
    webhook: int
    health: int
    metrics: int


def controller_config(ports: KueuePorts, webhook_cert_dir: Path) -> JSON:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2, the version v0.17 reads)."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kueue-system",
        # Only Jobs that name a LocalQueue: the other tests' worker Jobs are not Kueue's.
        "manageJobsWithoutQueueName": False,
        "internalCertManagement": {"enable": False},
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports.health}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports.metrics}"},
        "webhook": {"host": "127.0.0.1", "port": ports.webhook, "certDir": str(webhook_cert_dir)},
        "clientConnection": {"qps": 50, "burst": 100},
        "integrations": {"frameworks": ["batch/job"]},
        # The visibility API server wants an APIService and certificates of its own; no test uses it.
        "featureGates": {"VisibilityOnDemand": False},
    }


def launch_command(binary: Path, config: Path, etc_upper: Path, etc_work: Path) -> list[str]:
    """The controller in a user and mount namespace of its own, where /etc is an overlay that adds
    etc_upper (the metrics certificate) to the host's /etc, which stays untouched. The shell
    execs the controller, so the recorded pid is Kueue's."""
    script = 'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc && shift 2 && exec "$@"'
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "--",
        "/bin/sh",
        "-c",
        script,
        "kueue-etc-overlay",
        str(etc_upper),
        str(etc_work),
        str(binary),
        f"--config={config}",
        # V(2) logs say why a Job was stopped ("job with no matching workload, suspending").
        "--zap-log-level=2",
    ]


def webhook_configurations(manifests: list[JSON], port: int, ca_pem: bytes) -> list[JSON]:
    """Kueue's webhook configurations for a controller at https://127.0.0.1:<port>: only the
    webhooks of the groups it serves, each with a URL and the CA bundle, the Job webhooks only
    for Jobs that carry a queue-name label (so no other Job waits on Kueue)."""
    names = {
        "MutatingWebhookConfiguration": MUTATING_CONFIG,
        "ValidatingWebhookConfiguration": VALIDATING_CONFIG,
    }
    bundle = base64.b64encode(ca_pem).decode()
    result = []
    for original in manifests:
        doc = copy.deepcopy(original)
        doc["metadata"] = {"name": names[doc["kind"]]}
        hooks = []
        for hook in doc["webhooks"]:
            groups = {g for rule in hook["rules"] for g in rule["apiGroups"]}
            if not groups <= SERVED_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": bundle}
            if groups == {"batch"}:
                hook["objectSelector"] = {"matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]}
            hooks.append(hook)
        doc["webhooks"] = hooks
        result.append(doc)
    return result


def crd_for_controller(crd: JSON, port: int, ca_pem: bytes) -> JSON:
    """A CRD as Kueue's kustomization installs it: conversion by the controller's /convert."""
    crd = copy.deepcopy(crd)
    if crd["spec"]["names"]["plural"] in CONVERTED_CRDS:
        crd["spec"]["conversion"] = {
            "strategy": "Webhook",
            "webhook": {
                "clientConfig": {
                    "url": f"https://127.0.0.1:{port}/convert",
                    "caBundle": base64.b64encode(ca_pem).decode(),
                },
                "conversionReviewVersions": ["v1"],
            },
        }
    return crd


def probe_job() -> JSON:
    """A Job for a dry-run create: Kueue's webhook suspends a Job that names a queue."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"kueue-probe-{uuid.uuid4().hex[:6]}", "labels": {QUEUE_LABEL: "kueue-probe"}},
        "spec": {
            "suspend": False,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "probe", "image": "none"}],
                }
            },
        },
    }


# -- the controller ----------------------------------------------------------------------------------


class KueueController:
    """The Kueue controller as a process against a cluster's API server (admin credentials)."""

    def __init__(
        self,
        build: KueueBuild,
        kubeconfig: Path,
        work_dir: Path,
        log: Callable[[str], None] | None = None,
        on_spawn: Callable[[ProcessRecord], None] | None = None,
    ) -> None:
        """`on_spawn` learns the started process (LocalCluster.record: its `down` stops it too)."""
        self.build = build
        self.on_spawn = on_spawn
        self.kubeconfig = kubeconfig
        self.client = KubeClient.from_kubeconfig(kubeconfig)
        self.dir = work_dir
        self.log = log or (lambda msg: print(f"[kueue] {msg}", file=sys.stderr, flush=True))
        self.record: ProcessRecord | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.ports = KueuePorts(0, 0, 0)

    @property
    def log_path(self) -> Path:
        return self.dir / "logs" / "kueue.log"

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.record is not None and process_alive(self.record.pid, self.record.start_time)

    def start(self, timeout: float = 180) -> None:
        """Installs the CRDs, starts the controller and its webhooks; returns once they work."""
        if shutil.which("unshare") is None:
            raise ClusterError("Kueue's test harness needs `unshare` (util-linux) for the controller")
        for sub in ("logs", "pki", "webhook-certs", "etc-upper", "etc-work"):
            path = self.dir / sub
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        self.ports = KueuePorts(free_port(), free_port(), free_port())
        ca = CertificateAuthority(self.dir / "pki", "kueue-ca", "imagebatch-test-kueue-ca")
        serving = ca.issue("webhook", "kueue-webhook", hosts=("127.0.0.1",), client=False, server=True)
        ca_pem = ca.pair.cert.read_bytes()
        metrics_dir = self.dir / "etc-upper" / METRICS_CERT_DIR.removeprefix("etc/")
        for target in (self.dir / "webhook-certs", metrics_dir):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(serving.cert, target / "tls.crt")
            shutil.copy(serving.key, target / "tls.key")
        try:
            self._install_crds(ca_pem)
            config = self.dir / "config.yaml"
            config.write_text(yaml.safe_dump(controller_config(self.ports, self.dir / "webhook-certs")))
            argv = launch_command(self.build.binary, config, self.dir / "etc-upper", self.dir / "etc-work")
            env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
            self.log(f"starting kueue (webhooks on 127.0.0.1:{self.ports.webhook}), log {self.log_path}")
            self._proc, self.record = spawn("kueue", argv, self.dir / "logs", self.dir, env)
            if self.on_spawn is not None:
                self.on_spawn(self.record)
            wait_healthy(self.record, f"http://127.0.0.1:{self.ports.health}/readyz", timeout)
            manifests = [d for d in yaml.safe_load_all(self.build.webhook_manifests.read_text()) if d]
            for doc in webhook_configurations(manifests, self.ports.webhook, ca_pem):
                self._apply(self._webhook_path(doc["kind"], doc["metadata"]["name"]), doc)
            self._wait_webhook(timeout)
        except BaseException:
            self.stop()
            raise

    def _apply(self, path: str, doc: JSON) -> JSON:
        """Server-side apply (Kueue's workloads CRD is too big for a last-applied annotation)."""
        return self.client.request(
            "PATCH",
            path,
            doc,
            query={"fieldManager": FIELD_MANAGER, "force": True},
            content_type="application/apply-patch+yaml",
        )

    @staticmethod
    def _webhook_path(kind: str, name: str) -> str:
        plural = kind.lower() + "s"
        return f"/apis/admissionregistration.k8s.io/v1/{plural}/{name}"

    def _install_crds(self, ca_pem: bytes) -> None:
        names = []
        for path in self.build.crds:
            crd = crd_for_controller(yaml.safe_load(path.read_text()), self.ports.webhook, ca_pem)
            name = crd["metadata"]["name"]
            self._apply(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}", crd)
            names.append(name)

        def established() -> bool:
            for name in names:
                crd = self.client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
                conditions = (crd.get("status") or {}).get("conditions") or []
                if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                    return False
            return True

        wait_until("Kueue's CRDs to be Established", established, 60)

    def _wait_webhook(self, timeout: float) -> None:
        """The API server calls the Job webhook (its configuration reaches the API server's
        webhook cache a moment after the write): a dry-run Job comes back suspended."""
        job = probe_job()

        def suspended() -> bool:
            if not self.alive():
                raise ClusterError(f"kueue exited; log tail:\n{tail(self.log_path)}")
            try:
                created = self.client.request(
                    "POST", "/apis/batch/v1/namespaces/default/jobs", job, query={"dryRun": "All"}
                )
            except ApiError as err:
                if err.status >= 500:  # the webhook is not reachable yet
                    return False
                raise
            return bool(created["spec"].get("suspend"))

        try:
            wait_until("Kueue's Job webhook to suspend a dry-run Job", suspended, timeout)
        except ClusterError as err:
            raise ClusterError(f"{err}; kueue log tail:\n{tail(self.log_path)}") from None

    def stop(self) -> None:
        """Removes the webhook configurations first (no API call may wait on a stopped
        controller), then stops the process. The CRDs and Kueue objects stay."""
        for kind, name in (
            ("MutatingWebhookConfiguration", MUTATING_CONFIG),
            ("ValidatingWebhookConfiguration", VALIDATING_CONFIG),
        ):
            with contextlib.suppress(ApiError, OSError):
                self.client.delete(self._webhook_path(kind, name))
        if self.record is not None:
            stop_process_group(self.record.pid, self.record.start_time)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        self._proc = None


# -- queue objects (pure) ------------------------------------------------------------------------


def resource_flavor(name: str) -> JSON:
    return {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": name}}


def cluster_queue(name: str, flavor: str, quota: dict[str, str]) -> JSON:
    """A ClusterQueue for every namespace with `quota` (e.g. {"cpu": "500m"}) of one flavor,
    which preempts lower-priority workloads of its own to admit higher ones."""
    return {
        "apiVersion": API,
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {},
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [
                {
                    "coveredResources": sorted(quota),
                    "flavors": [
                        {
                            "name": flavor,
                            "resources": [{"name": r, "nominalQuota": q} for r, q in sorted(quota.items())],
                        }
                    ],
                }
            ],
        },
    }


def local_queue(namespace: str, name: str, cluster_queue_name: str) -> JSON:
    return {
        "apiVersion": API,
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": cluster_queue_name},
    }


def workload_priority_class(name: str, value: int) -> JSON:
    return {
        "apiVersion": API,
        "kind": "WorkloadPriorityClass",
        "metadata": {"name": name},
        "value": value,
        "description": "imagebatch tests",
    }


# -- queue objects in a cluster ----------------------------------------------------------------


@dataclass(frozen=True)
class TestQueues:
    """A test's own ResourceFlavor and ClusterQueue (cluster-scoped, so named after the test)
    and its LocalQueue in the test's namespace: jobs name `local_queue` in kueue.x-k8s.io/queue-name."""

    __test__ = False  # not a test class, despite the name

    namespace: str
    flavor: str
    cluster_queue: str
    local_queue: str
    low_priority: str = LOW_PRIORITY
    high_priority: str = HIGH_PRIORITY


def install_priority_classes(client: KubeClient) -> None:
    for name, value in PRIORITY_VALUES.items():
        path = f"/apis/{API}/workloadpriorityclasses/{name}"
        if client.get_or_none(path) is None:
            client.create(f"/apis/{API}/workloadpriorityclasses", workload_priority_class(name, value))


def _active(obj: JSON | None) -> bool:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Active" and c.get("status") == "True" for c in conditions)


def create_queues(client: KubeClient, namespace: str, quota: dict[str, str]) -> TestQueues:
    """Creates the queues and returns once Kueue reports the ClusterQueue and LocalQueue Active."""
    base = namespace[:50]
    queues = TestQueues(namespace, f"{base}-flavor", f"{base}-cq", "queue")
    client.create(f"/apis/{API}/resourceflavors", resource_flavor(queues.flavor))
    client.create(f"/apis/{API}/clusterqueues", cluster_queue(queues.cluster_queue, queues.flavor, quota))
    client.create(
        f"/apis/{API}/namespaces/{namespace}/localqueues",
        local_queue(namespace, queues.local_queue, queues.cluster_queue),
    )
    cq_path = f"/apis/{API}/clusterqueues/{queues.cluster_queue}"
    lq_path = f"/apis/{API}/namespaces/{namespace}/localqueues/{queues.local_queue}"
    wait_until(
        f"ClusterQueue {queues.cluster_queue} and LocalQueue {namespace}/{queues.local_queue} Active",
        lambda: _active(client.get_or_none(cq_path)) and _active(client.get_or_none(lq_path)),
        60,
    )
    return queues


def delete_queues(client: KubeClient, queues: TestQueues) -> None:
    """Deletes them without waiting (Kueue's finalizers go once nothing uses them)."""
    for path in (
        f"/apis/{API}/namespaces/{queues.namespace}/localqueues/{queues.local_queue}",
        f"/apis/{API}/clusterqueues/{queues.cluster_queue}",
        f"/apis/{API}/resourceflavors/{queues.flavor}",
    ):
        with contextlib.suppress(ApiError):
            client.delete(path)


def workloads(client: KubeClient, namespace: str) -> list[JSON]:
    items: list[JSON] = client.get(f"/apis/{API}/namespaces/{namespace}/workloads").get("items", [])
    return items


def workload_of_job(client: KubeClient, namespace: str, job_uid: str) -> JSON | None:
    """The Workload that Kueue made for a Job (owned by it), if any yet."""
    for wl in workloads(client, namespace):
        if any(ref.get("uid") == job_uid for ref in wl["metadata"].get("ownerReferences") or []):
            return wl
    return None


def workload_condition(wl: JSON | None, type_: str) -> JSON | None:
    for c in ((wl or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def admitted(wl: JSON | None) -> bool:
    return (workload_condition(wl, "Admitted") or {}).get("status") == "True"
