"""The test node itself: registers the Node, keeps its Lease, watches the pods bound to it.

Each pod gets a PodWorker (podworker.py); this module owns the Node object, its heartbeat and the
watch loop, and records container processes under work_dir/procs for `cluster down`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagebatch_testing.kubeapi import STRATEGIC_MERGE_PATCH, ApiError, KubeClient
from imagebatch_testing.nodelogs import LogServer, newest_pod_dir
from imagebatch_testing.podprocess import now
from imagebatch_testing.podworker import PodWorker, log

JSON = dict[str, Any]
HEARTBEAT_SECONDS = 10


@dataclass(frozen=True)
class KubeletApi:
    """Where the agent serves the kubelet API: a port and its TLS (serving pair, client CA)."""

    port: int
    cert: Path
    key: Path
    client_ca: Path


def micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node_architecture() -> str:
    return "amd64" if platform.machine() == "x86_64" else platform.machine()


def node_status(
    node_name: str, capacity: dict[str, str], kubelet_version: str, started: str, ts: str, port: int = 0
) -> JSON:
    """The Node's status: capacity, the pressure conditions (all fine) and Ready. Pure."""

    def cond(kind: str, status: str, reason: str, message: str) -> JSON:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": ts,
            "lastTransitionTime": started,
        }

    return {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "enough memory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "enough disk"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "enough PIDs"),
            cond("Ready", "True", "KubeletReady", "imagebatch node agent is posting ready status"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": node_name},
        ],
        # The kubelet API (nodelogs.py): where the API server asks for a container's log.
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "nodeInfo": {
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
            "kernelVersion": platform.release(),
            "osImage": "imagebatch node agent",
            "containerRuntimeVersion": "imagebatch://0.1",
            "kubeletVersion": kubelet_version,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": node_architecture(),
        },
    }


class NodeAgent:
    """Registers one Node and runs the pods bound to it."""

    def __init__(
        self,
        client: KubeClient,
        node_name: str,
        work_dir: Path,
        ca_file: Path,
        *,
        extra_capacity: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        kubelet_api: KubeletApi | None = None,
    ) -> None:
        self.client = client
        self.kubelet_api = kubelet_api
        self.log_server: LogServer | None = None
        self.node_name = node_name
        self.work_dir = work_dir
        self.ca_file = ca_file
        self.api_host = client.host
        self.api_port = client.port
        self.workers: dict[str, PodWorker] = {}
        self.workers_lock = threading.Lock()
        self.started = now()
        self.kubelet_version = "v0.0.0"
        self.stopping = threading.Event()
        venv_bin = os.path.dirname(sys.executable)
        self.path = os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
        self.capacity = {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 1024}Ki",
            "pods": "110",
            "ephemeral-storage": f"{shutil.disk_usage(work_dir).total // 1024}Ki",
        }
        self.capacity.update(extra_capacity or {})
        self.extra_labels = dict(labels or {})
        (work_dir / "procs").mkdir(parents=True, exist_ok=True)
        (work_dir / "pods").mkdir(parents=True, exist_ok=True)

    # -- processes, recorded for `cluster down` ---------------------------------------------

    def track(self, pid: int, start: int) -> None:
        (self.work_dir / "procs" / str(pid)).write_text(f"{pid} {start}\n")

    def untrack(self, pid: int) -> None:
        (self.work_dir / "procs" / str(pid)).unlink(missing_ok=True)

    def forget(self, uid: str) -> None:
        with self.workers_lock:
            self.workers.pop(uid, None)

    # -- the node ---------------------------------------------------------------------------

    def node_status(self) -> JSON:
        port = self.log_server.port if self.log_server is not None else 0
        return node_status(self.node_name, self.capacity, self.kubelet_version, self.started, now(), port)

    # -- the kubelet API's logs (nodelogs.py) --------------------------------------------------

    def _pod_worker(self, namespace: str, pod: str) -> PodWorker | None:
        with self.workers_lock:
            return next(
                (w for w in self.workers.values() if (w.namespace, w.pod_name) == (namespace, pod)), None
            )

    def container_log(self, namespace: str, pod: str, container: str) -> Path | None:
        worker = self._pod_worker(namespace, pod)
        folder = worker.dir if worker is not None else newest_pod_dir(self.work_dir / "pods", namespace, pod)
        return None if folder is None else folder / "logs" / f"{container}.log"

    def pod_running(self, namespace: str, pod: str) -> bool:
        """Whether the pod's containers may still write (a followed log ends when it is False)."""
        worker = self._pod_worker(namespace, pod)
        return worker is not None and worker.phase not in ("Succeeded", "Failed")

    def start_log_server(self) -> None:
        api = self.kubelet_api
        if api is None:
            return
        self.log_server = LogServer(
            self.client,
            self.node_name,
            api.port,
            api.cert,
            api.key,
            api.client_ca,
            self.container_log,
            self.pod_running,
        )
        self.log_server.start()
        log(f"kubelet API (container logs) on https://127.0.0.1:{self.log_server.port}")

    def register(self) -> None:
        with contextlib.suppress(ApiError):
            self.kubelet_version = str(self.client.get("/version").get("gitVersion", "v0.0.0"))
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": node_architecture(),
            "imagebatch.dev/node-agent": "true",
            **self.extra_labels,
        }
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": labels},
            "status": self.node_status(),
        }
        try:
            self.client.create("/api/v1/nodes", node)
            log(f"registered node {self.node_name}")
        except ApiError as err:
            if err.status != 409:
                raise
        self.heartbeat()

    def heartbeat(self) -> None:
        self.client.patch(
            f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()}, STRATEGIC_MERGE_PATCH
        )
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        lease = self.client.get_or_none(path)
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": micro_now()}
        if lease is None:
            node = self.client.get(f"/api/v1/nodes/{self.node_name}")
            self.client.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.node_name,
                        "ownerReferences": [
                            {
                                "apiVersion": "v1",
                                "kind": "Node",
                                "name": self.node_name,
                                "uid": node["metadata"]["uid"],
                            }
                        ],
                    },
                    "spec": spec,
                },
            )
        else:
            lease["spec"].update(spec)
            self.client.replace(path, lease)

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.heartbeat()
            except (ApiError, OSError) as err:
                log(f"heartbeat failed: {err}")

    # -- pods -------------------------------------------------------------------------------

    def handle(self, event_type: str, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        with self.workers_lock:
            worker = self.workers.get(uid)
            if event_type == "DELETED":
                if worker is not None:
                    worker.gone.set()
                    worker.deleting.set()
                return
            if worker is not None:
                worker.update(pod)
                return
            phase = pod.get("status", {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                if pod["metadata"].get("deletionTimestamp"):
                    # Finished before (or without) us: a kubelet removes it at once.
                    done = PodWorker(self, pod)
                    threading.Thread(target=done.remove, daemon=True).start()
                return
            worker = PodWorker(self, pod)
            worker.update(pod)
            self.workers[uid] = worker
        worker.start()

    def watch_pods(self) -> None:
        path = "/api/v1/pods"
        selector = f"spec.nodeName={self.node_name}"
        while not self.stopping.is_set():
            try:
                listing = self.client.get(path, fieldSelector=selector)
                for pod in listing.get("items") or []:
                    self.handle("ADDED", pod)
                version = listing["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    for event in self.client.watch(
                        path, resource_version=version, timeout_seconds=60, fieldSelector=selector
                    ):
                        obj = event["object"]
                        version = obj["metadata"].get("resourceVersion", version)
                        if event["type"] != "BOOKMARK":
                            self.handle(event["type"], obj)
            except (ApiError, OSError, ValueError) as err:
                if not self.stopping.is_set():
                    if not (isinstance(err, ApiError) and err.status == 410):
                        log(f"pod watch: {err}; listing again")
                    time.sleep(0.5)

    def shutdown(self) -> None:
        """Stops every container (SIGTERM, then SIGKILL after 2 s); pods stay in the API."""
        self.stopping.set()
        workers = list(self.workers.values())  # no lock: this may run in a signal handler
        for worker in workers:
            worker.kill_all(grace=2)

    def run(self) -> None:
        self.start_log_server()
        self.register()
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        self.watch_pods()
