"""The fleet harness of benchmarks/fleet.py and benchmarks/claims.py: simulated workers that the
real operator, the real Job controller and the real scheduler see as Running pods.

Not a benchmark itself: both import it. What it sets up, in this order:

- a local control plane (imagebatch_testing.cluster, no node agent), or the cluster of a given
  kubeconfig; the CRDs from crds/; the operator as a subprocess under the chart's RBAC
  (tests/e2e/harness.py's `Operator`, started as the end-to-end tests start it);
- a fake Node (`FakeNode`, the test node agent's registration and heartbeat, none of its pod
  processes): labelled and tainted so that only the benchmark's worker pods land on it, and
  nothing else; it marks each pod bound to it Running (a pods/status patch, as a kubelet does),
  passes deletions on as a SIGTERM would, and reports a finished worker's exit as the pod's end;
- `Fleet`: a few child processes of many threads (not one process per worker: memory); each pod
  that turns Running gets a thread in one of them that runs `body(sim)`, the benchmark's own
  worker loop, with the pod's name as the worker's identity (the claim holder).

So the workers claim exactly as worker pods do, whatever the claim protocol asks of a pod (an
assignment by the operator to Running pods of its worker Job included): the benchmarks never
create shards or pods themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import queue
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagebatch_testing.node import NodeAgent

REPO = Path(__file__).resolve().parents[1]
JSON = dict[str, Any]
GROUP_PATH = "/apis/imagebatch.dev/v1alpha1"
NODE_NAME = "fleet-node"
# The fake node's label and taint: the benchmark's worker pods select and tolerate it, so they
# never land on a real node agent (which would run real workers) and no other pod lands here.
NODE_LABEL = "imagebatch.dev/fleet-bench"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def fleet_workers_spec(replicas: int) -> JSON:
    """spec.workers of a benchmark job: `replicas` pods (one per shard of backlog), on the fake node."""
    return {
        "minReplicas": 0,
        "maxReplicas": replicas,
        "shardsPerReplica": 1,
        "gpusPerWorker": 0,
        "nodeSelector": {NODE_LABEL: "true"},
        "tolerations": [{"key": NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
    }


# -- the API server's and the operator's own accounts -----------------------------------------------


def metric_sums(text: str) -> dict[str, float]:
    """From the API server's /metrics, for imagebatchshards: response bytes and counts, watch event
    bytes and counts, write requests (POST, PUT, PATCH, APPLY) and those answered 409."""
    sums = dict.fromkeys(
        ("response_bytes", "responses", "watch_event_bytes", "watch_events", "writes", "conflicts"), 0.0
    )
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith("apiserver_response_sizes_") and 'resource="imagebatchshards"' in name:
            if name.startswith("apiserver_response_sizes_sum{"):
                sums["response_bytes"] += float(value)
            elif name.startswith("apiserver_response_sizes_count{"):
                sums["responses"] += float(value)
        elif name.startswith("apiserver_watch_events_sizes_") and (
            'kind="ImageBatchShard"' in name or 'resource="imagebatchshards"' in name
        ):
            if name.startswith("apiserver_watch_events_sizes_sum{"):
                sums["watch_event_bytes"] += float(value)
            elif name.startswith("apiserver_watch_events_sizes_count{"):
                sums["watch_events"] += float(value)
        elif (
            name.startswith("apiserver_request_total{")
            and 'resource="imagebatchshards"' in name
            and any(f'verb="{v}"' in name for v in ("POST", "PUT", "PATCH", "APPLY"))
        ):
            sums["writes"] += float(value)
            if 'code="409"' in name:
                sums["conflicts"] += float(value)
    return sums


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def process_usage(pid: int) -> JSON:
    """CPU seconds (user + system), resident and peak resident MB of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    kb = {k: int(status[k].split()[0]) for k in ("VmRSS", "VmHWM")}
    return {"cpu_s": cpu, "rss_mb": kb["VmRSS"] / 1024, "max_rss_mb": kb["VmHWM"] / 1024}


class ControlPlane:
    """The cluster, its CRDs and the operator; `close()` stops what it started."""

    def __init__(
        self, state_dir: str | None = None, kubeconfig: str | None = None, node_agent: bool = False
    ) -> None:
        """`node_agent`: the test node agent runs real worker pods (no fake node then)."""
        from imagebatch_testing.cluster import LocalCluster, build_binaries
        from imagebatch_testing.kubeapi import KubeClient
        from imagebatch_testing.kubectl import Kubectl, install_crds

        sys.path.insert(0, str(REPO / "tests" / "e2e"))
        from harness import Operator, operator_kubeconfig

        self.dir = Path(state_dir or tempfile.mkdtemp(prefix="fleet-bench-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        bin_dir = build_binaries()
        self.cluster: LocalCluster | None = None
        if kubeconfig is None:
            self.cluster = LocalCluster(self.dir / "cluster", bin_dir=bin_dir, node_agent=node_agent)
            self.cluster.up()
            kubeconfig = str(self.cluster.kubeconfig)
        self.kubeconfig = kubeconfig
        self.operator: Any = None
        self.node: FakeNode | None = None
        try:
            self.client = KubeClient.from_kubeconfig(kubeconfig)
            kubectl = Kubectl(bin_dir / "kubectl", Path(kubeconfig), self.dir / "kubectl-cache")
            install_crds(kubectl, REPO / "crds")
            work = self.dir / "operator"
            work.mkdir(exist_ok=True)
            config = operator_kubeconfig(self.client, kubectl, bin_dir / "helm", work / "kubeconfig")
            self.operator = Operator(config, work)
            self.operator.start()
            if not node_agent:
                self.node = FakeNode(self.client, self.dir / "fake-node")
                self.node.start()
        except BaseException:
            self.close()
            raise

    def metrics(self) -> dict[str, float]:
        status, text = self.client.get_raw("/metrics", timeout=120)
        if status != 200:
            raise SystemExit(f"cannot read the API server's /metrics: HTTP {status}")
        return metric_sums(text)

    def operator_usage(self) -> JSON:
        proc = self.operator.proc
        if proc is None or proc.poll() is not None:
            raise SystemExit(f"the operator exited; its log:\n{self.operator.log()[-3000:]}")
        return process_usage(proc.pid)

    def new_namespace(self, prefix: str) -> str:
        from imagebatch_testing.cluster import create_namespace

        ns = f"{prefix}-{uuid.uuid4().hex[:5]}"
        create_namespace(self.client, ns)
        return ns

    def delete_namespace(self, ns: str, timeout: float = 300) -> None:
        """Deletes it and waits until it is gone, so that its clean-up does not load the next run."""
        from imagebatch_testing.kubeapi import ApiError

        with contextlib.suppress(ApiError):
            self.client.delete(f"/api/v1/namespaces/{ns}")
        deadline = time.monotonic() + timeout
        while self.client.get_or_none(f"/api/v1/namespaces/{ns}") is not None:
            if time.monotonic() > deadline:
                print(f"namespace {ns} still there after {timeout:.0f}s; going on", file=sys.stderr)
                return
            time.sleep(1)

    def close(self) -> None:
        if self.node is not None:
            self.node.close()
        if self.operator is not None:
            self.operator.stop()
        if self.cluster is not None:
            self.cluster.down()


# -- the fake node: a kubelet that runs no containers -----------------------------------------------


class FakeNode(NodeAgent):
    """A Node whose pods are simulated workers: Running as soon as they are bound to it.

    The test node agent's registration, Lease and pod watch (imagebatch_testing.node.NodeAgent);
    its `handle` replaced: no container processes. `on_running(ns, pod)` and `on_stop(ns, pod)`
    (deletion: what SIGTERM tells a worker) are the Fleet's; it calls `ended(ns, pod, rc)`.
    """

    def __init__(self, client: Any, work_dir: Path) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            client,
            NODE_NAME,
            work_dir,
            work_dir / "no-ca",  # pods here run no process that would need it
            extra_capacity={"cpu": "100000", "memory": "1000Ti", "pods": "100000"},
            labels={NODE_LABEL: "true"},
        )
        self.on_running: Callable[[str, str], None] = lambda ns, pod: None
        self.on_stop: Callable[[str, str], None] = lambda ns, pod: None
        self.lock = threading.Lock()
        # (namespace, pod) -> "running", "stopping" (deletion seen while running) or "ended"
        self.pods: dict[tuple[str, str], str] = {}
        self.deleting: set[tuple[str, str]] = set()
        self.closed: set[str] = set()  # namespaces whose fleet is gone: their pods only end
        self.containers: dict[tuple[str, str], str] = {}

    def start(self) -> None:
        self.register()
        self.client.patch(
            f"/api/v1/nodes/{NODE_NAME}",
            {"spec": {"taints": [{"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}]}},
        )
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self.watch_pods, name="pod-watch", daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        with contextlib.suppress(Exception):
            self.client.delete(f"/api/v1/nodes/{NODE_NAME}")

    def _status(self, key: tuple[str, str], phase: str, state: JSON, ready: bool) -> None:
        from imagebatch_testing.node import micro_now
        from imagebatch_testing.podstatus import condition

        ts = micro_now()[:19] + "Z"
        container = self.containers.get(key, "worker")
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": ts,
            "conditions": [
                condition(kind, ok, ts)
                for kind, ok in (
                    ("PodReadyToStartContainers", True),
                    ("Initialized", True),
                    ("ContainersReady", ready),
                    ("Ready", ready),
                )
            ],
            "containerStatuses": [
                {
                    "name": container,
                    "ready": ready,
                    "started": ready,
                    "restartCount": 0,
                    "image": "fleet-bench",
                    "imageID": "fleet-bench",
                    "state": state,
                }
            ],
        }
        self.client.patch(f"/api/v1/namespaces/{key[0]}/pods/{key[1]}/status", {"status": status})

    def _remove(self, key: tuple[str, str]) -> None:
        from imagebatch_testing.kubeapi import ApiError

        with contextlib.suppress(ApiError):
            self.client.delete(f"/api/v1/namespaces/{key[0]}/pods/{key[1]}", gracePeriodSeconds=0)

    def handle(self, event_type: str, pod: JSON) -> None:
        meta = pod["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        phase = (pod.get("status") or {}).get("phase")
        with self.lock:
            state = self.pods.get(key)
            if key[0] in self.closed and event_type != "DELETED":
                # No worker will run or end it now: a deleted one goes at once, others wait.
                if meta.get("deletionTimestamp"):
                    self.deleting.add(key)
                    self.pods[key] = "ended"
                    threading.Thread(target=self._remove, args=(key,), daemon=True).start()
                return
            if event_type == "DELETED":
                self.pods.pop(key, None)
                if state == "running":
                    self.on_stop(*key)
                return
            if meta.get("deletionTimestamp"):
                self.deleting.add(key)
                if state == "running":
                    self.pods[key] = "stopping"
                    self.on_stop(*key)
                    return
                if state == "stopping":
                    return
                remove = True
            else:
                remove = False
                if state is not None or phase != "Pending":
                    return
                self.pods[key] = "running"
                self.containers[key] = str(pod["spec"]["containers"][0]["name"])
        if remove:
            self._remove(key)
            return
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._status(key, "Running", {"running": {"startedAt": ts}}, True)
        self.on_running(*key)

    def close_namespace(self, ns: str) -> None:
        """Its fleet stopped: pods whose worker never reported its end (one still in its API
        retries, one made after the stop) end now, so that the namespace can go."""
        with self.lock:
            self.closed.add(ns)
            left = [k for k, state in self.pods.items() if k[0] == ns and state in ("running", "stopping")]
        for key in left:
            self.ended(key[0], key[1], 143)

    def ended(self, ns: str, pod: str, rc: int) -> None:
        """A worker returned `rc`: its pod ends (and goes, if it was being deleted)."""
        from imagebatch_testing.kubeapi import ApiError

        key = (ns, pod)
        with self.lock:
            self.pods[key] = "ended"
            deleting = key in self.deleting
        if deleting:
            self._remove(key)
            return
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        terminated = {"exitCode": rc, "reason": "Completed" if rc == 0 else "Error", "finishedAt": ts}
        with contextlib.suppress(ApiError):
            self._status(key, "Succeeded" if rc == 0 else "Failed", {"terminated": terminated}, False)


# -- the simulated workers ------------------------------------------------------------------------


@dataclass
class Sim:
    """What a worker body gets: its pod's identity, its stop flag (SIGTERM), the start signal."""

    kubeconfig: str
    namespace: str
    job: str
    job_uid: str
    pod: str
    stop: threading.Event
    go: Any  # a multiprocessing Event: set once every worker of the fleet is ready
    settings: JSON
    ready: Callable[[], None]

    def worker(self, worker_class: type | None = None) -> tuple[Any, Any]:
        """The worker's own Worker on a client that counts its writes: (worker, kube)."""
        import kubernetes
        from kubernetes.client.exceptions import ApiException

        from imagebatch.kubeclient import TimeoutApiClient
        from imagebatch.worker.cluster import Worker
        from imagebatch.worker.kube import WorkerKube

        class CountingClient(TimeoutApiClient):
            """Counts every write request to shards, whatever method of the worker makes it."""

            writes: list[float]
            bodiless: list[float]

            def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
                if method in WRITE_METHODS and "/imagebatchshards" in url:
                    self.writes.append(time.time())
                try:
                    return super().request(method, url, *args, **kwargs)
                except ApiException as e:
                    if e.body is None:
                        # kubernetes' ApiClient decodes the body of every ApiException; one made
                        # with no response (status 0: an SSL error, e.g. a handshake that timed out
                        # under load) has none and comes out as an AttributeError, which the
                        # worker's retry does not know (256 workers starting at once met it).
                        # Given a body it stays the ApiException the worker retries.
                        e.body = b""
                        self.bodiless.append(time.time())
                    raise

        class CountingKube(WorkerKube):
            """Counts the fenced writes by what they did (claim, renewal, end) and the lost races."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.kinds: dict[str, list[float]] = {"claim": [], "renew": [], "end": []}
                self.conflicts = 0

            def replace_shard_status(self, shard: JSON, status: JSON) -> JSON | None:
                before = (shard.get("status") or {}).get("state") or "Pending"
                after = status.get("state")
                kind = "claim" if before == "Pending" else "renew" if after == before else "end"
                self.kinds[kind].append(time.time())
                written = super().replace_shard_status(shard, status)
                if written is None:
                    self.conflicts += 1
                return written

        conf = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=self.kubeconfig, client_configuration=conf)
        conf.retries = False  # as the worker's own client (worker/kube.py)
        api = CountingClient(conf)
        api.writes, api.bodiless = [], []
        kube = CountingKube(self.namespace, self.job, api=api)
        cls = worker_class or Worker
        return cls(kube, self.pod, self.stop, expected_uid=self.job_uid), kube


Body = Callable[[Sim], tuple[int, JSON]]


def _run_body(body: Body, sim: Sim, events: Any) -> None:
    try:
        rc, stats = body(sim)
    except Exception as e:  # reported, not hidden: the parent counts and prints it
        import traceback

        rc, stats = 1, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    events.put(("ended", sim.namespace, sim.pod, rc, stats))


def _child(body: Body, base: JSON, cmds: Any, events: Any, go: Any) -> None:
    """One child process: a thread per pod it is given, until told to stop them all."""
    # The workers write to a local folder outside any volume (no real pod here).
    os.environ["IMAGEBATCH_ACCESS_POLICY"] = '{"localPaths":"any"}'
    threads: list[threading.Thread] = []
    stops: dict[str, threading.Event] = {}
    while True:
        cmd = cmds.get()
        if cmd[0] == "start":
            pod = cmd[1]
            stops[pod] = threading.Event()

            def ready(pod: str = pod) -> None:
                events.put(("ready", base["namespace"], pod))

            sim = Sim(pod=pod, stop=stops[pod], go=go, ready=ready, **base)
            t = threading.Thread(target=_run_body, args=(body, sim, events), name=pod, daemon=True)
            t.start()
            threads.append(t)
        elif cmd[0] == "stop":
            if cmd[1] in stops:
                stops[cmd[1]].set()
        elif cmd[0] == "stop-all":
            go.set()  # a worker still waiting for the start must see its stop flag
            for stop in stops.values():
                stop.set()
            for t in threads:
                t.join(120)
            return


@dataclass
class Fleet:
    """The simulated workers of one job: a thread per Running pod, in `processes` children."""

    plane: ControlPlane
    namespace: str
    job: str
    job_uid: str
    body: Body
    settings: JSON
    processes: int
    ready: set[str] = field(default_factory=set)
    results: dict[str, JSON] = field(default_factory=dict)
    rcs: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.go = ctx.Event()
        self.events: Any = ctx.Queue()
        self.cmds = [ctx.Queue() for _ in range(self.processes)]
        self.owner: dict[str, int] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        base = {
            "kubeconfig": self.plane.kubeconfig,
            "namespace": self.namespace,
            "job": self.job,
            "job_uid": self.job_uid,
            "settings": self.settings,
        }
        self.procs = [
            ctx.Process(target=_child, args=(self.body, base, q, self.events, self.go), daemon=True)
            for q in self.cmds
        ]
        for p in self.procs:
            p.start()
        threading.Thread(target=self._events, name="fleet-events", daemon=True).start()
        node = self.plane.node
        assert node is not None
        node.on_running = self._running
        node.on_stop = self._stop

    def _running(self, ns: str, pod: str) -> None:
        if ns != self.namespace:
            return
        with self.lock:
            i = self.owner.setdefault(pod, len(self.owner) % self.processes)
        self.cmds[i].put(("start", pod))

    def _stop(self, ns: str, pod: str) -> None:
        if ns == self.namespace and pod in self.owner:
            self.cmds[self.owner[pod]].put(("stop", pod))

    def _events(self) -> None:
        while True:
            try:
                event = self.events.get(timeout=1)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return
            node = self.plane.node
            if event[0] == "ready":
                with self.lock:
                    self.ready.add(event[2])
                    self.changed.notify_all()
            elif event[0] == "ended":
                _, ns, pod, rc, stats = event
                if "error" in stats:
                    print(f"worker {pod} failed: {stats['traceback']}", file=sys.stderr, flush=True)
                with self.lock:
                    self.results[pod], self.rcs[pod] = stats, rc
                    self.changed.notify_all()
                if node is not None:
                    node.ended(ns, pod, rc)

    def wait(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not check():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(
                        f"timed out after {timeout:.0f}s waiting for {what}: {len(self.ready)} workers "
                        f"ready, {len(self.results)} ended; operator log tail:\n"
                        f"{self.plane.operator.log()[-3000:]}"
                    )
                self.changed.wait(min(left, 1.0))

    def wait_ready(self, n: int, timeout: float = 900) -> None:
        """Until `n` workers (pods Running, their shard views synced) wait for the start."""
        self.wait(f"{n} workers ready", lambda: len(self.ready) >= n, timeout)

    def start(self) -> float:
        """Lets every ready worker go; returns the wall-clock time of the start."""
        started = time.time()
        self.go.set()
        return started

    def wait_ended(self, n: int, timeout: float = 3600) -> None:
        self.wait(f"{n} workers to end", lambda: len(self.results) >= n, timeout)

    def outcomes(self) -> list[JSON]:
        """What every worker body returned; exits naming the first failure, if any."""
        results = list(self.results.values())
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise SystemExit(f"{len(errors)} of {len(results)} workers failed, the first: {errors[0]}")
        return results

    def close(self) -> None:
        """Stops every worker (as SIGTERM would) and the child processes."""
        for q in self.cmds:
            q.put(("stop-all",))
        for p in self.procs:
            p.join(180)
            if p.is_alive():
                p.kill()
        node = self.plane.node
        if node is not None:
            node.on_running = lambda ns, pod: None
            node.on_stop = lambda ns, pod: None
            node.close_namespace(self.namespace)


def create_job(plane: ControlPlane, ns: str, spec: JSON, name: str = "bench") -> JSON:
    job: JSON = plane.client.create(
        f"{GROUP_PATH}/namespaces/{ns}/imagebatchjobs",
        {
            "apiVersion": "imagebatch.dev/v1alpha1",
            "kind": "ImageBatchJob",
            "metadata": {"name": name},
            "spec": spec,
        },
    )
    return job


def in_window(stamps: list[float], start: float, end: float) -> int:
    return sum(1 for t in stamps if start <= t < end)


def add_plane_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", help="state dir of the control plane (default: a temporary one)")
    parser.add_argument("--kubeconfig", help="use this running cluster instead of starting one")


def machine() -> JSON:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}


@contextlib.contextmanager
def control_plane(
    state_dir: str | None, kubeconfig: str | None, node_agent: bool = False
) -> Iterator[ControlPlane]:
    plane = ControlPlane(state_dir, kubeconfig, node_agent)
    try:
        yield plane
    finally:
        plane.close()
