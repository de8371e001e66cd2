"""The local control plane behaves like a real cluster: Jobs, RBAC, Pod Security, deletion."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagebatch_testing.cluster import ClusterError, create_namespace, process_alive, wait_until
from imagebatch_testing.kubeapi import ApiError, KubeClient
from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster

JSON = dict[str, Any]


@pytest.fixture
def namespace(kube_cluster: TestCluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    create_namespace(kube_cluster.client, name)
    yield name
    kube_cluster.client.delete(f"/api/v1/namespaces/{name}")


def job_condition(job: JSON, kind: str) -> JSON | None:
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def python_job(name: str, code: str, *, completions: int = 1, backoff_limit: int = 6) -> JSON:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.11-slim",
                            "command": ["python", "-c", code],
                            "env": [
                                {
                                    "name": "POD_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                }
                            ],
                        }
                    ],
                }
            },
        },
    }


def wait_for_job(cluster: TestCluster, namespace: str, name: str, kind: str, timeout: float) -> JSON:
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}"
    job: JSON = {}

    def done() -> bool:
        nonlocal job
        job = cluster.client.get(path)
        return job_condition(job, kind) is not None

    try:
        wait_until(f"job {name} to be {kind}", done, timeout, interval=0.5)
    except ClusterError:
        pods = cluster.client.get(f"/api/v1/namespaces/{namespace}/pods")
        summary = [(p["metadata"]["name"], p.get("status", {}).get("phase")) for p in pods["items"]]
        raise AssertionError(
            f"job {name} not {kind}: {json.dumps(job.get('status'))}; pods {summary}"
        ) from None
    return job


def test_job_with_three_completions_completes(kube_cluster: TestCluster, namespace: str) -> None:
    code = "import os, sys; print('hello from', os.environ['POD_NAME'], sys.version_info[:2])"
    kube_cluster.client.create(
        f"/apis/batch/v1/namespaces/{namespace}/jobs", python_job("hello", code, completions=3)
    )
    job = wait_for_job(kube_cluster, namespace, "hello", "Complete", 180)
    assert job["status"]["succeeded"] == 3
    pods = kube_cluster.client.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="job-name=hello")
    assert len(pods["items"]) == 3
    for pod in pods["items"]:
        assert pod["status"]["phase"] == "Succeeded"
        (status,) = pod["status"]["containerStatuses"]
        assert status["state"]["terminated"]["exitCode"] == 0
        assert status["state"]["terminated"]["reason"] == "Completed"
        name = pod["metadata"]["name"]
        assert f"hello from {name}" in kube_cluster.pod_log(namespace, name)


def test_failing_job_retries_up_to_backoff_limit(kube_cluster: TestCluster, namespace: str) -> None:
    code = "import sys; print('failing on purpose'); sys.exit(3)"
    kube_cluster.client.create(
        f"/apis/batch/v1/namespaces/{namespace}/jobs", python_job("fails", code, backoff_limit=1)
    )
    job = wait_for_job(kube_cluster, namespace, "fails", "Failed", 180)
    failed = job_condition(job, "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded"
    assert job["status"]["failed"] == 2  # the first try and one retry
    pods = kube_cluster.client.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="job-name=fails")
    for pod in pods["items"]:
        assert pod["status"]["phase"] == "Failed"
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import os, pathlib, signal, sys, time
    out = pathlib.Path(os.environ["OUT"])
    def mark(name, text):  # atomic: the test polls for the file, then reads it
        (out / (name + ".tmp")).write_text(text)
        os.replace(out / (name + ".tmp"), out / name)
    def on_term(signum, frame):
        mark("terminated", "SIGTERM")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    mark("started", str(os.getpid()))
    while True:
        time.sleep(0.1)
    """
)


def test_deleting_a_running_pod_sends_sigterm(
    kube_cluster: TestCluster, namespace: str, tmp_path: Path
) -> None:
    if kube_cluster.local is None:
        pytest.skip("needs the local node agent (the marker file is on this machine)")
    out = tmp_path / "out"
    out.mkdir()
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 20,
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11-slim",
                    "command": ["python", "-c", SIGTERM_SCRIPT],
                    "env": [{"name": "OUT", "value": str(out)}],
                    "volumeMounts": [{"name": "out", "mountPath": str(out)}],
                }
            ],
            "volumes": [{"name": "out", "hostPath": {"path": str(out), "type": "Directory"}}],
        },
    }
    client = kube_cluster.client
    path = f"/api/v1/namespaces/{namespace}/pods/sleeper"
    client.create(f"/api/v1/namespaces/{namespace}/pods", pod)
    wait_until("the pod's process to start", (out / "started").exists, 60)
    wait_until("the pod to be Running", lambda: client.get(path)["status"].get("phase") == "Running", 30)
    running = client.get(path)
    assert running["status"]["podIP"] == "127.0.0.1"
    ready = {c["type"]: c["status"] for c in running["status"]["conditions"]}
    assert ready["Ready"] == "True" and ready["PodScheduled"] == "True"
    pid = int((out / "started").read_text())

    client.delete(path)
    wait_until("the SIGTERM marker", (out / "terminated").exists, 30)
    assert (out / "terminated").read_text() == "SIGTERM"
    wait_until("the pod to be removed", lambda: client.get_or_none(path) is None, 30)
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_service_account_without_binding_is_forbidden(kube_cluster: TestCluster, namespace: str) -> None:
    client = kube_cluster.client
    client.create(f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": "nobody"}})
    answer = client.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/nobody/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 600},
        },
    )
    nobody: KubeClient = client.with_token(answer["status"]["token"])
    # The token authenticates ...
    review = nobody.create(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:nobody"
    # ... but without a RoleBinding RBAC lets it do nothing.
    with pytest.raises(ApiError) as err:
        nobody.get(f"/api/v1/namespaces/{namespace}/pods")
    assert err.value.status == 403
    with pytest.raises(ApiError) as err:
        nobody.create(f"/api/v1/namespaces/{namespace}/configmaps", {"metadata": {"name": "x"}})
    assert err.value.status == 403


def privileged_pod(name: str) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["sleep", "1"],
                    "securityContext": {"privileged": True},
                }
            ]
        },
    }


def test_restricted_namespace_rejects_privileged_pod(kube_cluster: TestCluster) -> None:
    client = kube_cluster.client
    name = f"t-restricted-{uuid.uuid4().hex[:6]}"
    create_namespace(client, name, {"pod-security.kubernetes.io/enforce": "restricted"})
    try:
        with pytest.raises(ApiError) as err:
            client.create(f"/api/v1/namespaces/{name}/pods", privileged_pod("priv"))
        assert err.value.status == 403
        assert "violates PodSecurity" in err.value.message
    finally:
        client.delete(f"/api/v1/namespaces/{name}")


def test_unlabelled_namespace_admits_privileged_pod(kube_cluster: TestCluster, namespace: str) -> None:
    # The contrast to the test above: the label, not the pod alone, makes the difference.
    pod = kube_cluster.client.request(
        "POST", f"/api/v1/namespaces/{namespace}/pods", privileged_pod("priv"), query={"dryRun": "All"}
    )
    assert pod["spec"]["containers"][0]["securityContext"]["privileged"] is True


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_cli_teardown_stops_only_its_processes(kube_cluster: TestCluster, tmp_path: Path) -> None:
    state = tmp_path / "second-cluster"
    cli = [sys.executable, "-m", "imagebatch_testing.cluster"]
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args, "--dir", str(state), "--node-name", "second-node"],
            cwd=tmp_path,
            env=env,
            text=True,
            capture_output=True,
            timeout=600,
            check=check,
        )

    up = run("up", check=False)
    assert up.returncode == 0, up.stderr[-4000:]
    try:
        status = json.loads(run("status").stdout)
        assert status["ready"] and all(status["processes"].values())
        recorded = json.loads((state / "state.json").read_text())
        # A pod of the second cluster, so that its container process is ours to stop too.
        second = KubeClient.from_kubeconfig(state / "admin.kubeconfig")
        second.create(
            "/api/v1/namespaces/default/pods",
            {
                "metadata": {"name": "sleep"},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": "none",
                            "command": ["python", "-c", "import time; time.sleep(600)"],
                        }
                    ]
                },
            },
        )
        wait_until(
            "the second cluster's pod to run",
            lambda: second.get("/api/v1/namespaces/default/pods/sleep")["status"].get("phase") == "Running",
            60,
        )
        pod_procs = [
            tuple(int(x) for x in p.read_text().split()) for p in (state / "node" / "procs").glob("*")
        ]
        assert pod_procs
    finally:
        down = run("down", check=False)
    assert down.returncode == 0, down.stderr[-4000:]
    for proc in recorded["processes"]:
        assert not process_alive(proc["pid"], proc["start_time"]), proc
    for pid, start in pod_procs:
        assert not process_alive(pid, start)
    busy = [port for port in recorded["ports"].values() if listening(port)]
    assert busy == []
    # The session's cluster was left alone.
    if kube_cluster.local is not None:
        assert kube_cluster.local.is_up()
        assert all(listening(port) for port in kube_cluster.local.state.ports.values())
    assert kube_cluster.client.get_raw("/readyz")[0] == 200


API_SCRIPT = textwrap.dedent(
    """
    import json, os, pathlib
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()  # the node agent's per-pod KUBECONFIG
    mounts = json.loads(os.environ.get("IMAGEBATCH_PATH_MAP") or "{}")
    settings = pathlib.Path(mounts.get("/etc/settings", "/etc/settings"))
    scratch = pathlib.Path(mounts.get("/scratch", "/scratch"))
    (scratch / "x").write_text("ok")
    v1 = client.CoreV1Api()
    namespace = os.environ["NAMESPACE"]
    maps = sorted(c.metadata.name for c in v1.list_namespaced_config_map(namespace).items)
    try:
        v1.list_namespaced_secret(namespace)
        secrets = "allowed"
    except ApiException as err:
        secrets = err.status
    print("RESULT " + json.dumps({
        "maps": maps,
        "secrets": secrets,
        "file": (settings / "greeting").read_text(),
        "greeting": os.environ["GREETING"],
        "password": os.environ["PASSWORD"],
        "prefixed": os.environ["CM_greeting"],
        "node": os.environ["NODE"],
        "scratch": (scratch / "x").read_text(),
    }, sort_keys=True))
    """
)


def test_pod_gets_config_and_talks_to_the_api_as_its_service_account(
    kube_cluster: TestCluster, namespace: str
) -> None:
    if kube_cluster.local is None:
        pytest.skip("the pod runs with this repository's Python (the kubernetes package)")
    client = kube_cluster.client
    ns = f"/api/v1/namespaces/{namespace}"
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    client.create(f"{ns}/serviceaccounts", {"metadata": {"name": "reader"}})
    client.create(
        f"{rbac}/roles",
        {
            "metadata": {"name": "read-configmaps"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
    )
    client.create(
        f"{rbac}/rolebindings",
        {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    client.create(f"{ns}/configmaps", {"metadata": {"name": "settings"}, "data": {"greeting": "hello"}})
    client.create(f"{ns}/secrets", {"metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}})
    job = python_job("api", API_SCRIPT, backoff_limit=0)
    pod_spec = job["spec"]["template"]["spec"]
    pod_spec["serviceAccountName"] = "reader"
    pod_spec["volumes"] = [
        {"name": "settings", "configMap": {"name": "settings"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    container = pod_spec["containers"][0]
    container["volumeMounts"] = [
        {"name": "settings", "mountPath": "/etc/settings", "readOnly": True},
        {"name": "scratch", "mountPath": "/scratch"},
    ]
    container["envFrom"] = [{"prefix": "CM_", "configMapRef": {"name": "settings"}}]
    container["env"] += [
        {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
    ]
    client.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", job)
    try:
        wait_for_job(kube_cluster, namespace, "api", "Complete", 120)
    finally:
        pods = client.get(f"{ns}/pods", labelSelector="job-name=api")["items"]
        logs = "".join(kube_cluster.pod_log(namespace, p["metadata"]["name"]) for p in pods)
    result_line = next((line for line in logs.splitlines() if line.startswith("RESULT ")), None)
    assert result_line is not None, logs
    node = pods[0]["spec"]["nodeName"]
    assert json.loads(result_line[len("RESULT ") :]) == {
        "maps": ["kube-root-ca.crt", "settings"],
        "secrets": 403,
        "file": "hello",
        "greeting": "hello",
        "password": "s3cret",
        "prefixed": "hello",
        "node": node,
        "scratch": "ok",
    }


RESTART_SCRIPT = textwrap.dedent(
    """
    import json, os, pathlib, sys
    mounts = json.loads(os.environ.get("IMAGEBATCH_PATH_MAP") or "{}")
    marker = pathlib.Path(mounts.get("/state", "/state")) / "tried"
    if not marker.exists():
        marker.write_text("1")
        print("first try fails")
        sys.exit(1)
    print("second try succeeds")
    """
)


def test_on_failure_restarts_the_container_in_place(kube_cluster: TestCluster, namespace: str) -> None:
    client = kube_cluster.client
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "flaky"},
        "spec": {
            "restartPolicy": "OnFailure",
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11-slim",
                    "command": ["python", "-c", RESTART_SCRIPT],
                    "volumeMounts": [{"name": "state", "mountPath": "/state"}],
                }
            ],
            "volumes": [{"name": "state", "emptyDir": {}}],
        },
    }
    path = f"/api/v1/namespaces/{namespace}/pods/flaky"
    client.create(f"/api/v1/namespaces/{namespace}/pods", pod)
    wait_until("the pod to succeed", lambda: client.get(path)["status"].get("phase") == "Succeeded", 90)
    (status,) = client.get(path)["status"]["containerStatuses"]
    assert status["restartCount"] == 1
    assert status["state"]["terminated"]["exitCode"] == 0
    assert status["lastState"]["terminated"]["exitCode"] == 1
    log = kube_cluster.pod_log(namespace, "flaky")
    assert "first try fails" in log and "second try succeeds" in log
