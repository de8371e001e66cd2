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

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagebatch_testing.certs import CertificateAuthority, KeyPair, service_account_keys
from imagebatch_testing.kubeapi import ApiError, KubeClient

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "cluster" / "build.sh"
DEFAULT_NODE_NAME = "imagebatch-node"
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
# Processes that stop in this order; pods (run by the node agent) go last, see down().
_STOP_ORDER = ("nodeagent", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")


def _pairs(text: str) -> dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'}."""
    return dict(item.strip().split("=", 1) for item in text.split(",") if "=" in item)


def default_state_dir() -> Path:
    return Path(os.environ.get("IMAGEBATCH_CLUSTER_DIR", "/tmp/imagebatch-cluster"))


class ClusterError(RuntimeError):
    """The cluster could not be built, started or stopped."""


def build_binaries(timeout: float = 3600) -> Path:
    """Runs hack/cluster/build.sh (cached, so quick when nothing is missing); returns the bin dir."""
    if not BUILD_SCRIPT.exists():
        raise ClusterError(f"missing {BUILD_SCRIPT}")
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, timeout=timeout, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ClusterError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
    bin_dir = Path(lines[-1])
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"):
        if not os.access(bin_dir / name, os.X_OK):
            raise ClusterError(f"{BUILD_SCRIPT} did not produce {bin_dir / name}")
    return bin_dir


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- processes --------------------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """The start time of a live process (clock ticks since boot); None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return None
    return int(fields[19])


def process_alive(pid: int, start_time: int) -> bool:
    """Whether `pid` still is the process that started at `start_time` (not a reused pid)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and has exited
    return process_start_time(pid) == start_time


def stop_process_group(pid: int, start_time: int, grace: float = 10.0) -> None:
    """SIGTERM to the process group led by `pid` (a session leader we started), then SIGKILL."""
    if not process_alive(pid, start_time):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # children left behind by a dead leader
        return
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and process_alive(pid, start_time):
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and process_alive(pid, start_time):
        time.sleep(0.05)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:])


def _ssl_insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def http_ok(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError, ssl.SSLError):
        return False


def wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, ApiError):
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def kubeconfig(server: str, ca: Path, user: str, cert: Path | None = None, key: Path | None = None) -> str:
    """A self-contained kubeconfig (certificates inline), as JSON, which is valid YAML."""

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    creds: dict[str, str] = {}
    if cert and key:
        creds = {"client-certificate-data": b64(cert), "client-key-data": b64(key)}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "imagebatch-test", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}
        ],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "imagebatch-test", "context": {"cluster": "imagebatch-test", "user": user}}],
        "current-context": "imagebatch-test",
    }
    return json.dumps(config, indent=2) + "\n"


# -- the cluster ------------------------------------------------------------------------------


@dataclass
class ProcessRecord:
    name: str
    pid: int
    start_time: int
    log: str


@dataclass
class ClusterState:
    """What state.json records: enough for another process to stop the cluster and use it."""

    ports: dict[str, int] = field(default_factory=dict)
    processes: list[ProcessRecord] = field(default_factory=list)
    bin_dir: str = ""
    node_name: str = DEFAULT_NODE_NAME
    ready: bool = False

    def to_json(self) -> str:
        return json.dumps(
            {
                "ports": self.ports,
                "processes": [vars(p) for p in self.processes],
                "bin_dir": self.bin_dir,
                "node_name": self.node_name,
                "ready": self.ready,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        data = json.loads(text)
        return cls(
            ports={k: int(v) for k, v in data.get("ports", {}).items()},
            processes=[ProcessRecord(**p) for p in data.get("processes", [])],
            bin_dir=data.get("bin_dir", ""),
            node_name=data.get("node_name", DEFAULT_NODE_NAME),
            ready=bool(data.get("ready")),
        )


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
        self.node_capacity = _pairs(os.environ.get("IMAGEBATCH_NODE_CAPACITY", "")) | (node_capacity or {})
        self.node_labels = _pairs(os.environ.get("IMAGEBATCH_NODE_LABELS", "")) | (node_labels or {})
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
        return (
            self.state.ready
            and bool(self.state.processes)
            and all(process_alive(p.pid, p.start_time) for p in self.state.processes)
        )

    # -- start ------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ProcessRecord:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=env,
                start_new_session=True,  # its own process group, so down() can stop all of it
            )
        self._children.append(proc)
        start_time = None
        for _ in range(100):
            start_time = process_start_time(proc.pid)
            if start_time is not None:
                break
            time.sleep(0.01)
        if start_time is None:
            raise ClusterError(f"{name} exited at once:\n{tail(log_path)}")
        record = ProcessRecord(name, proc.pid, start_time, str(log_path))
        self.state.processes.append(record)
        self._save_state()
        (self.logs / f"{name}.cmd").write_text(" ".join(argv) + "\n")
        return record

    def _wait_healthy(self, record: ProcessRecord, url: str, timeout: float) -> None:
        ctx = _ssl_insecure() if url.startswith("https") else None

        def check() -> bool:
            if not process_alive(record.pid, record.start_time):
                raise ClusterError(f"{record.name} exited; log tail:\n{tail(Path(record.log))}")
            return http_ok(url, ctx)

        try:
            wait_until(f"{record.name} at {url}", check, timeout)
        except ClusterError as err:
            if "exited" in str(err):
                raise
            raise ClusterError(f"{err}; log tail of {record.name}:\n{tail(Path(record.log))}") from None

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
        assert self.bin_dir is not None
        bins = self.bin_dir
        for sub in ("etcd-data", "logs", "pki", "node", "kcm-certs", "scheduler-certs"):
            path = self.dir / sub
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        for stale in ("admin.kubeconfig", "state.json"):
            (self.dir / stale).unlink(missing_ok=True)
        ports = {
            name: free_port()
            for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler")
        }
        self.state = ClusterState(ports=ports, bin_dir=str(bins), node_name=self.node_name)
        self._save_state()
        server = f"https://127.0.0.1:{ports['apiserver']}"

        # Certificates: one CA for serving and clients, one key for ServiceAccount tokens.
        pki = self.pki
        ca = CertificateAuthority(pki)
        apiserver_cert = ca.issue(
            "apiserver",
            "kube-apiserver",
            hosts=(
                "127.0.0.1",
                "localhost",
                KUBERNETES_SERVICE_IP,
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            client=False,
            server=True,
        )
        admin = ca.issue("admin", "kubernetes-admin", organizations=("system:masters",))
        kcm = ca.issue("controller-manager", "system:kube-controller-manager")
        scheduler = ca.issue("scheduler", "system:kube-scheduler")
        node = ca.issue("node", f"system:node:{self.node_name}", organizations=("system:nodes",))
        sa: KeyPair = service_account_keys(pki)
        # The aggregation layer's CA and client (request-header authentication), as kubeadm sets up.
        front_proxy_ca = CertificateAuthority(pki, "front-proxy-ca", "imagebatch-test-front-proxy-ca")
        front_proxy = front_proxy_ca.issue("front-proxy-client", "front-proxy-client")

        def write_kubeconfig(name: str, user: str, pair: KeyPair) -> Path:
            path = self.dir / f"{name}.kubeconfig"
            path.write_text(kubeconfig(server, ca.pair.cert, user, pair.cert, pair.key))
            path.chmod(0o600)
            return path

        kcm_config = write_kubeconfig("controller-manager", "system:kube-controller-manager", kcm)
        scheduler_config = write_kubeconfig("scheduler", "system:kube-scheduler", scheduler)
        node_config = write_kubeconfig("node", f"system:node:{self.node_name}", node)

        # etcd
        self.log(f"starting etcd on 127.0.0.1:{ports['etcd']}")
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
        etcd = self._spawn(
            "etcd",
            [
                str(bins / "etcd"),
                "--name=default",
                f"--data-dir={self.dir / 'etcd-data'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        self._wait_healthy(etcd, f"{etcd_url}/health", 30)

        # kube-apiserver
        self.log(f"starting kube-apiserver on {server}")
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(bins / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ports['apiserver']}",
                f"--tls-cert-file={apiserver_cert.cert}",
                f"--tls-private-key-file={apiserver_cert.key}",
                f"--client-ca-file={ca.pair.cert}",
                "--authorization-mode=Node,RBAC",
                "--anonymous-auth=true",
                "--allow-privileged=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # The default admission plugins (NamespaceLifecycle, LimitRanger, ServiceAccount,
                # PodSecurity, ResourceQuota, webhooks, ...) plus the node's restrictions.
                "--enable-admission-plugins=NodeRestriction",
                f"--service-account-issuer={server}",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                # No kubelet serves the Service's endpoint; 127.0.0.1 is not a valid endpoint.
                "--endpoint-reconciler-type=none",
                f"--requestheader-client-ca-file={front_proxy_ca.pair.cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={front_proxy.cert}",
                f"--proxy-client-key-file={front_proxy.key}",
                "--v=1",
            ],
        )
        self._wait_healthy(apiserver, f"{server}/readyz", timeout)
        self.kubeconfig.write_text(
            kubeconfig(server, ca.pair.cert, "kubernetes-admin", admin.cert, admin.key)
        )
        self.kubeconfig.chmod(0o600)

        # kube-controller-manager and kube-scheduler
        self.log("starting kube-controller-manager and kube-scheduler")
        controller_manager = self._spawn(
            "kube-controller-manager",
            [
                str(bins / "kube-controller-manager"),
                f"--kubeconfig={kcm_config}",
                f"--authentication-kubeconfig={kcm_config}",
                f"--authorization-kubeconfig={kcm_config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['controller-manager']}",
                f"--cert-dir={self.dir / 'kcm-certs'}",
                "--leader-elect=false",
                "--controllers=*",
                f"--service-account-private-key-file={sa.key}",
                f"--root-ca-file={ca.pair.cert}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={ca.pair.cert}",
                f"--cluster-signing-key-file={ca.pair.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--v=1",
            ],
        )
        kube_scheduler = self._spawn(
            "kube-scheduler",
            [
                str(bins / "kube-scheduler"),
                f"--kubeconfig={scheduler_config}",
                f"--authentication-kubeconfig={scheduler_config}",
                f"--authorization-kubeconfig={scheduler_config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['scheduler']}",
                f"--cert-dir={self.dir / 'scheduler-certs'}",
                "--leader-elect=false",
                "--v=1",
            ],
        )

        # The node agent (a kubelet stand-in) runs with this Python.
        if self.with_node_agent:
            self.log(f"starting the node agent for node {self.node_name}")
            env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "PYTHONSAFEPATH")}
            self._spawn(
                "nodeagent",
                [
                    sys.executable,
                    "-m",
                    "imagebatch_testing.nodeagent",
                    f"--kubeconfig={node_config}",
                    f"--node-name={self.node_name}",
                    f"--work-dir={self.node_dir}",
                    f"--ca-file={ca.pair.cert}",
                    *(f"--capacity={k}={v}" for k, v in self.node_capacity.items()),
                    *(f"--label={k}={v}" for k, v in self.node_labels.items()),
                ],
                env=env,
            )
        self._wait_healthy(controller_manager, f"https://127.0.0.1:{ports['controller-manager']}/healthz", 60)
        self._wait_healthy(kube_scheduler, f"https://127.0.0.1:{ports['scheduler']}/healthz", 60)

        client = self.client()
        wait_until(
            "the default ServiceAccount of namespace default",
            lambda: client.get_or_none("/api/v1/namespaces/default/serviceaccounts/default") is not None,
            60,
        )
        if self.with_node_agent:
            agent = next(p for p in self.state.processes if p.name == "nodeagent")

            def node_ready() -> bool:
                if not process_alive(agent.pid, agent.start_time):
                    raise ClusterError(f"the node agent exited; log tail:\n{tail(Path(agent.log))}")
                return node_schedulable(client.get_or_none(f"/api/v1/nodes/{self.node_name}"))

            wait_until(f"node {self.node_name} to be Ready and untainted", node_ready, 90)
        self.state.ready = True
        self._save_state()

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
            result["apiserver_ready"] = http_ok(f"{self.server}/readyz", _ssl_insecure())
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


def node_schedulable(node: dict[str, Any] | None) -> bool:
    if not node:
        return False
    taints = node.get("spec", {}).get("taints") or []
    if any(t.get("key") == "node.kubernetes.io/not-ready" for t in taints):
        return False
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


# -- helpers for tests ------------------------------------------------------------------------


def create_namespace(client: KubeClient, name: str, labels: dict[str, str] | None = None) -> None:
    """Creates a namespace and waits for its default ServiceAccount (pods need it)."""
    client.create(
        "/api/v1/namespaces", {"metadata": {"name": name, "labels": labels or {}}, "apiVersion": "v1"}
    )
    wait_until(
        f"the default ServiceAccount of namespace {name}",
        lambda: client.get_or_none(f"/api/v1/namespaces/{name}/serviceaccounts/default") is not None,
        60,
    )


@contextlib.contextmanager
def running_cluster(state_dir: Path | str | None = None, **kwargs: Any) -> Iterator[LocalCluster]:
    cluster = LocalCluster(state_dir, **kwargs)
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


# -- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagebatch_testing.cluster", description=__doc__)
    parser.add_argument("command", choices=("up", "down", "status", "build"))
    parser.add_argument(
        "--dir", default=None, help="state dir (default: $IMAGEBATCH_CLUSTER_DIR or /tmp/imagebatch-cluster)"
    )
    parser.add_argument("--node-name", default=DEFAULT_NODE_NAME)
    parser.add_argument("--no-node-agent", action="store_true", help="start only the control plane")
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build_binaries())
        return 0
    cluster = LocalCluster(args.dir, node_name=args.node_name, node_agent=not args.no_node_agent)
    try:
        if args.command == "up":
            cluster.up(timeout=args.timeout)
            print(f"export KUBECONFIG={cluster.kubeconfig}")
        elif args.command == "down":
            cluster.down()
            busy = cluster.listening_ports()
            if busy:
                print(f"still listening: {busy}", file=sys.stderr)
                return 1
        else:
            status = cluster.status()
            print(json.dumps(status, indent=2))
            return 0 if cluster.is_up() else 1
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
