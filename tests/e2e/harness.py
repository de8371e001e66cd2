"""Helpers of the end-to-end tests: kubectl, the operator as a subprocess, waiting, examples.

The operator runs under the chart's RBAC with a real ServiceAccount token, as it would in a
cluster; workers are pods that the test node agent runs as local processes.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from imagebatch.names import LABEL_JOB
from imagebatch_testing.cluster import free_port
from imagebatch_testing.kubeapi import KubeClient
from imagebatch_testing.kubectl import Kubectl

REPO = Path(__file__).resolve().parents[2]
JSON = dict[str, Any]
OPERATOR_NAMESPACE = "imagebatch-system"
RELEASE = "imagebatch"


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- the operator's identity: the chart's RBAC, a real ServiceAccount token ------------------------


def chart_rbac(helm: Path) -> list[JSON]:
    """The chart's ServiceAccount, ClusterRoles and bindings (helm template, nothing else)."""
    proc = subprocess.run(
        [
            str(helm),
            "template",
            RELEASE,
            str(REPO / "charts" / "imagebatch"),
            "--namespace",
            OPERATOR_NAMESPACE,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    return [d for d in yaml.safe_load_all(proc.stdout) if d and d.get("kind") in kinds]


def operator_kubeconfig(client: KubeClient, kubectl: Kubectl, helm: Path, path: Path) -> Path:
    """Installs the chart's RBAC and writes a kubeconfig holding its ServiceAccount's token."""
    if client.get_or_none(f"/api/v1/namespaces/{OPERATOR_NAMESPACE}") is None:
        kubectl("create", "namespace", OPERATOR_NAMESPACE)
    docs = chart_rbac(helm)
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    sa = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
    token = client.create(
        f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/serviceaccounts/{sa}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 86400},
        },
    )["status"]["token"]
    admin = yaml.safe_load(kubectl.kubeconfig.read_text())
    cluster = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": sa}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


# The test node runs pods as local processes and cannot mount volumes, so the tests' jobs read and
# write plain local folders, and their S3 server listens on a port of its own: the operator lets
# workers do that (the chart's worker.access.localPaths=any, s3Endpoints=["*"]).
# tests/e2e/test_confinement.py runs an operator with the chart's own defaults instead.
TEST_NODE_ACCESS = ("--worker-local-paths=any", "--worker-s3-endpoints=*")


class Operator:
    """`python -m imagebatch.operator` as a subprocess; kill() and start() again to test restarts."""

    def __init__(self, kubeconfig: Path, log_dir: Path, access: tuple[str, ...] = TEST_NODE_ACCESS) -> None:
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.access = access
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.metrics_port = 0

    def start(self) -> None:
        self.starts += 1
        self.metrics_port = free_port()
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        log = open(self.log_dir / f"operator-{self.starts}.log", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-P",  # the repo's operator/ folder must not shadow the stdlib's operator module
                "-m",
                "imagebatch.operator",
                "--all-namespaces",
                "--interval=1",
                f"--metrics-port={self.metrics_port}",
                "--worker-metrics-port=0",
                "--scale-down-cool-down=3",
                *self.access,
            ],
            cwd=self.log_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crashed or evicted operator."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-20000:] for p in sorted(self.log_dir.glob("operator-*.log"))
        )

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text

    def passes(self, namespace: str, job: str) -> int:
        """Finished reconcile passes of a job, from the operator's own metrics."""
        labels = (f'namespace="{namespace}"', f'job="{job}"')
        for line in self.metrics().splitlines():
            if line.startswith("imagebatch_job_reconciles_total{") and all(x in line for x in labels):
                return int(float(line.rsplit(" ", 1)[1]))
        return 0

    def wait_passes(self, namespace: str, job: str, n: int = 2) -> None:
        """Returns once the operator has finished `n` more passes of the job: with n >= 2, at
        least one whole pass started after the call (the way to show that something did NOT
        happen, instead of sleeping)."""
        start = self.passes(namespace, job)
        wait_for(
            f"{n} more operator passes of {job}",
            lambda: self.passes(namespace, job) >= start + n,
            timeout=300,
            interval=0.2,
        )


# -- jobs -----------------------------------------------------------------------------------------

TINY_ENV = [{"name": "OMP_NUM_THREADS", "value": "1"}]

# IMAGEBATCH_TEST_SPEED=4 makes every image of these tests about 4x cheaper (a quarter of the
# denoising steps), 0.25 about 4x dearer: the suite must pass on machines of any speed, so it is
# run both ways to show that no test depends on how long a shard takes.
SPEED = float(os.environ.get("IMAGEBATCH_TEST_SPEED", "1"))


def steps(n: int) -> int:
    """A step count scaled by IMAGEBATCH_TEST_SPEED."""
    return max(1, round(n / SPEED))


def tiny_job(name: str, out: str, **spec: Any) -> JSON:
    """A job for builtin:tiny at 32x32, 4 steps: about 100 images/s per core."""
    if "generation" in spec and "steps" in spec["generation"]:
        spec["generation"] = {**spec["generation"], "steps": steps(spec["generation"]["steps"])}
    base: JSON = {
        "model": {"name": "builtin:tiny"},
        "generation": {"width": 32, "height": 32, "steps": steps(4)},
        "batching": {"batchSize": 32, "shardSize": 50},
        "output": {"uri": out},
        "workers": {"maxReplicas": 2, "gpusPerWorker": 0, "env": TINY_ENV},
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatchJob",
        "metadata": {"name": name},
        "spec": base,
    }


def for_test_cluster(doc: JSON, out_dir: Path, s3_endpoint: str | None, prompt_dir: Path) -> JSON:
    """An example made runnable on the test node: builtin:tiny when it names a real model (no
    downloads, no GPU), no GPUs, local folders for volume paths (the node agent cannot mount
    PersistentVolumeClaims), the test's S3 server for s3:// outputs. Prompts stay as written."""
    doc = copy.deepcopy(doc)
    spec = doc["spec"]
    if not spec["model"]["name"].startswith("builtin:"):
        spec["model"] = {"name": "builtin:tiny"}
        spec["generation"] = {**spec.get("generation", {}), "width": 32, "height": 32, "steps": steps(4)}
    workers = spec.setdefault("workers", {})
    workers["gpusPerWorker"] = 0
    workers["env"] = [*workers.get("env", []), *TINY_ENV]
    mounts = {m["mountPath"]: m for m in workers.pop("volumeMounts", [])}
    workers.pop("volumes", None)

    def local(path: str) -> str:
        for mount in mounts:
            if path.startswith(mount.rstrip("/") + "/"):
                return str(out_dir / path[len(mount) :].lstrip("/"))
        return str(out_dir / path.lstrip("/"))

    out = spec["output"]
    if out["uri"].startswith("s3://"):
        assert s3_endpoint is not None
        out["endpointUrl"] = s3_endpoint
        # The S3 server lives for the whole session: a prefix of this test's own, so two tests
        # that run the same example never find each other's images (and job.json).
        bucket, _, key = out["uri"][5:].partition("/")
        out["uri"] = f"s3://{bucket}/{out_dir.name}-{uuid.uuid4().hex[:8]}/{key}"
    else:
        out["uri"] = local(out["uri"])
    src = spec.get("promptsFrom") or {}
    if src.get("uri") and not src["uri"].startswith("s3://"):
        src["uri"] = str(prompt_dir / Path(src["uri"]).name)
    return doc


def example_docs() -> Iterator[tuple[str, list[JSON]]]:
    for path in sorted((REPO / "examples").glob("*.yaml")):
        yield path.name, [d for d in yaml.safe_load_all(path.read_text()) if d]


# -- reading results ------------------------------------------------------------------------------


def ibj(kubectl: Kubectl, namespace: str, name: str) -> JSON:
    return kubectl.json("get", "ibj", name, "-n", namespace)


def _of_job(job: str | None) -> list[str]:
    return ["-l", f"{LABEL_JOB}={job}"] if job else []


def shards(kubectl: Kubectl, namespace: str, job: str | None = None) -> list[JSON]:
    """The ImageBatchShards of the namespace (a test's namespace holds its own jobs only), or of
    one job of it."""
    items: list[JSON] = kubectl.json("get", "ibs", "-n", namespace, *_of_job(job))["items"]
    return items


def live_pods(kubectl: Kubectl, namespace: str, job: str | None = None) -> list[JSON]:
    """The pods of the namespace (or of one job's workers) that have not ended."""
    pods: list[JSON] = kubectl.json("get", "pods", "-n", namespace, *_of_job(job))["items"]
    return [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]


def condition(job: JSON, type_: str) -> JSON | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def wait_condition(kubectl: Kubectl, namespace: str, name: str, type_: str, timeout: int) -> None:
    """Waits for a condition to be True, as `kubectl wait` does, but gives up at once when the
    job ends the other way (Failed while waiting for Complete, or the reverse); on failure, says
    where the job is."""
    opposite = {"Complete": "Failed", "Failed": "Complete"}.get(type_)

    def settled() -> str | None:
        job = ibj(kubectl, namespace, name)
        for t in (type_, opposite):
            if t and (condition(job, t) or {}).get("status") == "True":
                return t
        return None

    try:
        reached = wait_for(f"ibj/{name} {type_}", settled, timeout, interval=0.5)
    except AssertionError as e:
        reached, why = None, str(e)
    else:
        why = f"it is {reached}"
    if reached != type_:
        status = json.dumps(ibj(kubectl, namespace, name).get("status"), indent=1)
        shards = kubectl("get", "ibs", "-n", namespace, check=False).stdout
        raise AssertionError(f"ibj/{name} not {type_}: {why}\nstatus: {status}\n{shards}")


def worker_pids(pod_processes: list[tuple[int, int]], pod: str) -> list[int]:
    """The local processes the node agent runs for a pod (found by their POD_NAME)."""
    found = []
    for pid, _start in pod_processes:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"POD_NAME={pod}".encode() in env:
            found.append(pid)
    return found


def check_output_dir(out: Path, expected_ids: set[str] | int, ext: str = "png") -> list[JSON]:
    """Every image present once, and manifest.jsonl has one line per image, no duplicates."""
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    ids = [line["id"] for line in lines]
    images = {p.name for p in (out / "images").iterdir() if ".tmp-" not in p.name}
    n = expected_ids if isinstance(expected_ids, int) else len(expected_ids)
    assert len(ids) == len(set(ids)) == n, f"{len(ids)} manifest lines, {len(set(ids))} distinct, want {n}"
    assert images == {f"{i}.{ext}" for i in ids}
    if not isinstance(expected_ids, int):
        assert set(ids) == expected_ids
    return lines


# -- failpoints: a worker stopped at a known point (worker/failpoints.py) ----------------------------


class Failpoints:
    """The env that arms a failpoint in a job's workers, and the marks they leave when they act."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory

    def env(self, spec: str) -> list[JSON]:
        return [
            *TINY_ENV,
            {"name": "IMAGEBATCH_FAILPOINTS", "value": spec},
            {"name": "IMAGEBATCH_FAILPOINT_DIR", "value": str(self.dir)},
        ]

    def marks(self, point: str) -> list[JSON]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob(f"{point}-*.json"))]

    def wait(self, point: str, timeout: float = 600) -> JSON:
        """The first worker that reached `point` (it has stopped or holds there now)."""
        found: list[JSON] = wait_for(
            f"a worker at failpoint {point}", lambda: self.marks(point), timeout, 0.1
        )
        return found[0]

    def release(self) -> None:
        """Lets every `hold` go on, and disarms it for workers that get there later."""
        (self.dir / "release").write_text("")


def scaling_history(kubectl: Kubectl, namespace: str, name: str) -> list[int]:
    """The worker counts the operator set, from its ScaledUp/ScaledDown Events, in order."""
    events = kubectl.json("get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    counts: list[tuple[str, int]] = []
    for e in events["items"]:
        msg = e.get("message", "")
        if e.get("reason") == "ScaledUp" and msg.startswith("started worker Job with "):
            counts.append((e["metadata"]["creationTimestamp"], int(msg.split()[4])))
        elif e.get("reason") in ("ScaledUp", "ScaledDown") and " -> " in msg:
            counts.append((e["metadata"]["creationTimestamp"], int(msg.rsplit(" ", 1)[-1])))
    return [n for _, n in sorted(counts, key=lambda c: c[0])]
