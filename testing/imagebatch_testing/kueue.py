"""Kueue (sigs.k8s.io/kueue) for the local test cluster: the real controller, run as a process.

hack/kueue/build.sh builds the controller from its Go module and keeps the CRDs and webhook
manifests of the same version (cached by version). `KueueController.start()` installs the CRDs,
starts the controller against the cluster's API server (leader election off, only the batch/job
integration, only Jobs with a `kueue.x-k8s.io/queue-name` label managed) and installs its webhook
configurations with `clientConfig.url: https://127.0.0.1:<port>/...` and a CA of its own (Kueue's
internal cert management wants a Service in front of the webhook, which a cluster without pod
networking cannot have). Ready means: readyz answers and the Job webhook has defaulted a dry-run
Job. See docs/test-cluster.md.

What it is started with: imagebatch_testing.kueueconfig; the queues of a test:
imagebatch_testing.kueuequeues.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imagebatch_testing.binaries import REPO_ROOT
from imagebatch_testing.certs import CertificateAuthority
from imagebatch_testing.kubeapi import ApiError, KubeClient
from imagebatch_testing.kueueconfig import (
    FIELD_MANAGER,
    METRICS_CERT_DIR,
    MUTATING_CONFIG,
    VALIDATING_CONFIG,
    KueuePorts,
    controller_config,
    crd_for_controller,
    launch_command,
    log_records,
    probe_job,
    webhook_configurations,
)
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

    def log_records(self, namespace: str) -> list[JSON]:
        """The controller's (JSON) log records about objects of one namespace."""
        return log_records(self.read_log(), namespace)

    def alive(self) -> bool:
        return self.record is not None and process_alive(self.record.pid, self.record.start_time)

    def start(self, timeout: float = 180) -> None:
        """Installs the CRDs, starts the controller and its webhooks; returns once they work."""
        if shutil.which("unshare") is None:
            raise ClusterError("Kueue's test harness needs `unshare` (util-linux) for the controller")
        started = time.monotonic()
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
        self.log(f"kueue ready in {time.monotonic() - started:.1f} s")

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
