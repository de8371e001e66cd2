"""A real Kubernetes control plane for tests, run as local processes (no container engine).

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are built from Go modules by
hack/cluster/build.sh (cached by version) and started here on free ports of 127.0.0.1, with
certificates generated for the occasion, RBAC and ServiceAccount tokens on. A node agent
(imagebatch_testing.nodeagent) stands in for a kubelet and runs pods as local processes.

Use it as a library (LocalCluster), from pytest (imagebatch_testing.pytest_plugin), or from the
command line:

    python -m imagebatch_testing.cluster up|down|status [--dir DIR]

The state dir (default ${IMAGEBATCH_CLUSTER_DIR:-/tmp/imagebatch-cluster}) holds the certificates,
kubeconfigs (admin.kubeconfig), logs, etcd data and state.json, which records the processes that
were started so that `down` stops exactly those. See docs/test-cluster.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imagebatch_testing import components
from imagebatch_testing.binaries import build_binaries
from imagebatch_testing.components import ClusterPki, issue_certificates, kubeconfig
from imagebatch_testing.kubeapi import KubeClient
from imagebatch_testing.processes import (
    ClusterError,
    ProcessRecord,
    free_port,
    http_ok,
    paused,
    process_alive,
    process_start_time,
    spawn,
    ssl_insecure,
    stop_process_group,
    tail,
    wait_healthy,
    wait_until,
)
from imagebatch_testing.readiness import create_namespace, node_schedulable
from imagebatch_testing.state import DEFAULT_NODE_NAME, ClusterState, default_state_dir, parse_pairs

# What tests and scripts import from here (the names kept their home when the module was split).
__all__ = [
    "DEFAULT_NODE_NAME",
    "ClusterError",
    "ClusterState",
    "LocalCluster",
    "ProcessRecord",
    "build_binaries",
    "create_namespace",
    "default_state_dir",
    "free_port",
    "http_ok",
    "kubeconfig",
    "node_schedulable",
    "process_alive",
    "process_start_time",
    "running_cluster",
    "stop_process_group",
    "tail",
    "wait_until",
]

# Processes that stop in this order; pods (run by the node agent) go last, see down().
_STOP_ORDER = ("nodeagent", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + a node agent.

    `up()` builds (or finds cached) binaries, generates certificates and starts everything,
    waiting for each piece to be healthy; `down()` stops exactly the processes recorded in the
    state dir, including pods that the node agent started. A LocalCluster made on an existing
    state dir (e.g. by `python -m imagebatch_testing.cluster up`) can stop or inspect it.
    """

    def __init__(
        self,
        state_dir: Path | str | None = None,
        *,
        bin_dir: Path | str | None = None,
        node_name: str = DEFAULT_NODE_NAME,
        node_agent: bool = True,
        node_capacity: dict[str, str] | None = None,
        node_labels: dict[str, str] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.dir = Path(state_dir) if state_dir else default_state_dir()
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.node_name = node_name
        self.with_node_agent = node_agent
        # Extra node capacity (e.g. {"nvidia.com/gpu": "1"}) and labels; the environment variables
        # IMAGEBATCH_NODE_CAPACITY / IMAGEBATCH_NODE_LABELS ("k=v,k=v") add to them.
        self.node_capacity = parse_pairs(os.environ.get("IMAGEBATCH_NODE_CAPACITY", "")) | (
            node_capacity or {}
        )
        self.node_labels = parse_pairs(os.environ.get("IMAGEBATCH_NODE_LABELS", "")) | (node_labels or {})
        self.log = log or (lambda msg: print(f"[cluster] {msg}", file=sys.stderr, flush=True))
        self.state = self._load_state()
        self._children: list[subprocess.Popen[bytes]] = []

    # -- paths and accessors ----------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (user kubernetes-admin, group system:masters)."""
        return self.dir / "admin.kubeconfig"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def node_dir(self) -> Path:
        """The node agent's work dir: pods/<namespace>_<name>_<uid>/{logs,volumes,...}."""
        return self.dir / "node"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.state.ports['apiserver']}"

    def client(self) -> KubeClient:
        return KubeClient.from_kubeconfig(self.kubeconfig)

    def _state_file(self) -> Path:
        return self.dir / "state.json"

    def _load_state(self) -> ClusterState:
        try:
            return ClusterState.from_json(self._state_file().read_text())
        except (OSError, ValueError):
            return ClusterState()

    def _save_state(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file().with_suffix(".tmp")
        tmp.write_text(self.state.to_json())
        tmp.replace(self._state_file())

    def running_processes(self) -> list[ProcessRecord]:
        return [p for p in self.state.processes if process_alive(p.pid, p.start_time)]

    def is_up(self) -> bool:
        """Ready, and every process of the cluster itself lives (not those it only records)."""
        own = [p for p in self.state.processes if p.name in _STOP_ORDER]
        return self.state.ready and bool(own) and all(process_alive(p.pid, p.start_time) for p in own)

    # -- start ------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ProcessRecord:
        proc, record = spawn(name, argv, self.logs, self.dir, env)
        self._children.append(proc)
        self.state.processes.append(record)
        self._save_state()  # at once: a `down` from elsewhere must find every started process
        return record

    def record(self, record: ProcessRecord) -> None:
        """Records a process started next to the cluster (Kueue, say): `down` stops it too."""
        self.state.processes.append(record)
        self._save_state()

    def up(self, timeout: float = 180.0) -> None:
        """Starts the cluster; raises ClusterError (after stopping what it started) on failure."""
        if self.running_processes():
            raise ClusterError(f"a cluster already runs from {self.dir}; stop it with `down` first")
        started = time.monotonic()
        if self.bin_dir is None:
            self.log("building or finding binaries (hack/cluster/build.sh)")
            self.bin_dir = build_binaries()
        try:
            self._up(timeout)
        except BaseException:
            self.log("start failed; stopping what was started")
            self.down()
            raise
        self.log(f"cluster up in {time.monotonic() - started:.1f} s; KUBECONFIG={self.kubeconfig}")

    def _up(self, timeout: float) -> None:
        """Starts etcd, the API server, the controller manager, the scheduler and the node agent,
        each once what it needs is healthy; the cluster is ready when its node is."""
        assert self.bin_dir is not None
        self._fresh_dirs()
        ports = {name: free_port() for name in components.PORT_NAMES}
        self.state = ClusterState(ports=ports, bin_dir=str(self.bin_dir), node_name=self.node_name)
        self._save_state()
        pki = issue_certificates(self.pki, self.node_name)
        self._start_etcd()
        self._start_apiserver(pki, timeout)
        self.log("starting kube-controller-manager and kube-scheduler")
        controller_manager = self._spawn(
            "kube-controller-manager",
            components.controller_manager_command(
                self.bin_dir,
                self._component_kubeconfig(pki, "controller-manager"),
                ports,
                self.dir / "kcm-certs",
                pki,
            ),
        )
        scheduler = self._spawn(
            "kube-scheduler",
            components.scheduler_command(
                self.bin_dir,
                self._component_kubeconfig(pki, "scheduler"),
                ports,
                self.dir / "scheduler-certs",
            ),
        )
        if self.with_node_agent:
            self._start_node_agent(pki)
        for record, port in ((controller_manager, "controller-manager"), (scheduler, "scheduler")):
            wait_healthy(record, f"https://127.0.0.1:{ports[port]}/healthz", 60)
        self._wait_ready()
        self.state.ready = True
        self._save_state()

    def _fresh_dirs(self) -> None:
        """Empties what a previous run left: a cluster always starts from nothing."""
        for sub in ("etcd-data", "logs", "pki", "node", "kcm-certs", "scheduler-certs"):
            path = self.dir / sub
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        for stale in ("admin.kubeconfig", "state.json"):
            (self.dir / stale).unlink(missing_ok=True)

    def _component_kubeconfig(self, pki: ClusterPki, name: str) -> Path:
        """The kubeconfig of a component, as the user its certificate names."""
        pair, user = {
            "controller-manager": (pki.controller_manager, "system:kube-controller-manager"),
            "scheduler": (pki.scheduler, "system:kube-scheduler"),
            "node": (pki.node, f"system:node:{self.node_name}"),
            "admin": (pki.admin, "kubernetes-admin"),
        }[name]
        path = self.dir / f"{name}.kubeconfig"
        path.write_text(kubeconfig(self.server, pki.ca.cert, user, pair.cert, pair.key))
        path.chmod(0o600)
        return path

    def _start_etcd(self) -> None:
        assert self.bin_dir is not None
        url = components.etcd_client_url(self.state.ports)
        self.log(f"starting etcd on {url}")
        etcd = self._spawn(
            "etcd", components.etcd_command(self.bin_dir, self.dir / "etcd-data", self.state.ports)
        )
        wait_healthy(etcd, f"{url}/health", 30)

    def _start_apiserver(self, pki: ClusterPki, timeout: float) -> None:
        assert self.bin_dir is not None
        self.log(f"starting kube-apiserver on {self.server}")
        apiserver = self._spawn(
            "kube-apiserver", components.apiserver_command(self.bin_dir, self.state.ports, pki)
        )
        wait_healthy(apiserver, f"{self.server}/readyz", timeout)
        # admin.kubeconfig (self.kubeconfig), written once the API answers: its presence means usable.
        self._component_kubeconfig(pki, "admin")

    def _start_node_agent(self, pki: ClusterPki) -> None:
        self.log(f"starting the node agent for node {self.node_name}")
        # The agent is a client of this cluster only; pods get their own KUBECONFIG from it.
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "PYTHONSAFEPATH")}
        argv = components.nodeagent_command(
            sys.executable,
            self._component_kubeconfig(pki, "node"),
            self.node_name,
            self.node_dir,
            pki.ca.cert,
            *(self.node_capacity, self.node_labels, self.state.ports.get("kubelet", 0), pki.node_serving),
        )
        self._spawn("nodeagent", argv, env=env)

    def _wait_ready(self) -> None:
        """The default ServiceAccount exists (pods need it) and the node, if any, is schedulable."""
        client = self.client()
        wait_until(
            "the default ServiceAccount of namespace default",
            lambda: client.get_or_none("/api/v1/namespaces/default/serviceaccounts/default") is not None,
            60,
        )
        if not self.with_node_agent:
            return
        agent = next(p for p in self.state.processes if p.name == "nodeagent")

        def node_ready() -> bool:
            if not process_alive(agent.pid, agent.start_time):
                raise ClusterError(f"the node agent exited; log tail:\n{tail(Path(agent.log))}")
            return node_schedulable(client.get_or_none(f"/api/v1/nodes/{self.node_name}"))

        wait_until(f"node {self.node_name} to be Ready and untainted", node_ready, 90)

    # -- stop -------------------------------------------------------------------------------

    def pod_processes(self) -> list[tuple[int, int]]:
        """(pid, start time) of the container processes the node agent has running."""
        result = []
        for record in (self.node_dir / "procs").glob("*"):
            try:
                pid, start = (int(x) for x in record.read_text().split())
            except (OSError, ValueError):
                continue
            result.append((pid, start))
        return result

    def down(self) -> None:
        """Stops the processes recorded in the state dir (and their pods); keeps the files."""
        if not self.state.processes:
            self.state = self._load_state()
        by_name = {p.name: p for p in self.state.processes}
        for name in _STOP_ORDER:
            record = by_name.get(name)
            if record is not None:
                stop_process_group(record.pid, record.start_time)
        for pid, start in self.pod_processes():
            stop_process_group(pid, start, grace=2)
        for record in self.state.processes:  # anything else recorded
            stop_process_group(record.pid, record.start_time)
        for proc in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._children.clear()
        self.state.ready = False
        if self.dir.exists():
            self._save_state()

    def paused(self, name: str) -> contextlib.AbstractContextManager[ProcessRecord]:
        """One of the cluster's processes frozen (SIGSTOP) while a block runs, then resumed."""
        return paused(next(p for p in self.state.processes if p.name == name))

    def listening_ports(self) -> list[int]:
        """The recorded ports that something still listens on."""
        busy = []
        for port in self.state.ports.values():
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    busy.append(port)
        return busy

    def status(self) -> dict[str, Any]:
        procs = {p.name: process_alive(p.pid, p.start_time) for p in self.state.processes}
        result: dict[str, Any] = {"dir": str(self.dir), "ready": self.state.ready, "processes": procs}
        if self.state.ports.get("apiserver"):
            result["server"] = self.server
            result["kubeconfig"] = str(self.kubeconfig)
            result["apiserver_ready"] = http_ok(f"{self.server}/readyz", ssl_insecure())
        return result

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of every component's log, for a failing test's report."""
        return "\n".join(f"--- {log.name} ---\n{tail(log, lines)}" for log in sorted(self.logs.glob("*.log")))

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        """The output of a pod's containers (all restarts), from the node agent's files."""
        chunks = []
        for pod_dir in sorted((self.node_dir / "pods").glob(f"{namespace}_{name}_*")):
            for log in sorted((pod_dir / "logs").glob("*.log")):
                if container is None or log.stem == container:
                    chunks.append(log.read_text(errors="replace"))
        return "".join(chunks)

    def __enter__(self) -> LocalCluster:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


@contextlib.contextmanager
def running_cluster(state_dir: Path | str | None = None, **kwargs: Any) -> Iterator[LocalCluster]:
    cluster = LocalCluster(state_dir, **kwargs)
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


if __name__ == "__main__":
    # `python -m imagebatch_testing.cluster`: the command line lives in clustercli.py.
    from imagebatch_testing.clustercli import main

    sys.exit(main())
