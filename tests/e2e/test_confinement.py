"""Issue 18 (2 and 4): with the chart's defaults, a job's workers read only what the job declared.

On the local control plane with the chart's admission policies and an operator started with the
chart's own worker.access flags (rendered by helm, not written here): a prompt file named at the
worker's token path, at a file outside the job's volumes (directly, through `..` and through a
symbolic link) or at an http:// URL ends the job Failed with a message that names the rule, no
byte of the target (real ServiceAccount tokens) appears in what the namespace's users can read
(the job's status, its shards, the Events, the pods' termination messages), and the http server
is never asked. A prompt file inside the job's volume still makes its images.

The node agent runs pods as local processes: a hostPath volume mounted at its own path is the
volume the workers see, so bob (who may create pods, as the job-creator policy asks of hostPath)
writes those jobs; alice, who may create jobs but not pods, writes the others.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Kubectl, Operator, check_output_dir, condition, ibj, tiny_job, wait_condition, wait_for
from test_security import Team, helm_template, team, token_of

from imagebatch.access import PROMPTS_FIELD
from imagebatch_testing.kubeapi import ApiError
from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster

__all__ = ["team"]  # the fixture: alice and bob in a namespace of their own, the chart's policies

TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"
ACCESS_FLAGS = (
    "--worker-local-paths",
    "--worker-uri-schemes",
    "--worker-http-hosts",
    "--worker-s3-endpoints",
)


def chart_access_flags() -> tuple[str, ...]:
    """The worker.access flags of the chart's operator Deployment, with the chart's defaults."""
    (dep,) = [d for d in helm_template("ibconf", "imagebatch-system") if d["kind"] == "Deployment"]
    args: list[str] = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    found = tuple(a for a in args if a.split("=", 1)[0] in ACCESS_FLAGS)
    assert len(found) == len(ACCESS_FLAGS), args
    return found


@pytest.fixture(scope="module")
def chart_operator(operator: Operator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator with the chart's default access rules, in place of the session's (which lets
    workers use local folders, as the test node needs): one operator at a time."""
    operator.stop()
    op = Operator(operator.kubeconfig, tmp_path_factory.mktemp("chart-operator"), access=chart_access_flags())
    op.start()
    try:
        yield op
    finally:
        op.stop()
        operator.start()


class Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in for a cloud metadata server: what it would answer, and who asked."""

    asked: list[str] = []
    body = b"zq-metadata-canary AKIAZQCANARY\n"

    def do_GET(self) -> None:
        Recorder.asked.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def metadata_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/latest/meta-data/iam/security-credentials/"
    finally:
        server.shutdown()


def _token(kube_cluster: TestCluster, ns: str) -> str | None:
    try:
        return token_of(kube_cluster.client, ns, "default")
    except ApiError:
        return None  # the ServiceAccount controller has not made it yet


def readable(kubectl: Kubectl, ns: str) -> str:
    """Everything of the namespace that the job's users can read about its jobs: the jobs'
    status, the shards, the Events, the pods' status with their termination messages."""
    docs = [kubectl.json("get", kind, "-n", ns) for kind in ("ibj", "ibs", "events", "pods")]
    return json.dumps(docs)


def test_workers_read_only_what_the_job_declared(
    kube_cluster: TestCluster,
    kubectl: Kubectl,
    chart_operator: Operator,
    team: Team,
    tmp_path: Path,
    metadata_server: str,
) -> None:
    if kube_cluster.local is None:
        pytest.skip("the hostPath volumes are local folders of the test node")
    ns = team.namespace
    # A real ServiceAccount token of the namespace, in a file outside every job's volumes.
    secret_dir = tmp_path / "elsewhere"
    secret_dir.mkdir()
    stolen = wait_for("the namespace's default ServiceAccount", lambda: _token(kube_cluster, ns), timeout=120)
    (secret_dir / "token.csv").write_text(f"{stolen}\n")
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "link.csv").symlink_to(secret_dir / "token.csv")
    (vol / "prompts.txt").write_text("a lighthouse\na harbour\n")
    volume = {
        "volumes": [{"name": "data", "hostPath": {"path": str(vol), "type": "Directory"}}],
        "volumeMounts": [{"name": "data", "mountPath": str(vol)}],
    }
    # alice's jobs write to an emptyDir (a volume type every creator may use): never reached.
    scratch = {
        "volumes": [{"name": "out", "emptyDir": {}}],
        "volumeMounts": [{"name": "out", "mountPath": "/out"}],
    }
    cases: dict[str, tuple[str, str, dict[str, Any], str]] = {
        # name: (who, prompt uri, workers, what the message must say)
        "token": ("alice", TOKEN_PATH, scratch, "lies in the worker's own system folders"),
        "outside": (
            "alice",
            str(secret_dir / "token.csv"),
            scratch,
            "is not inside any of the job's volume mounts",
        ),
        "dotdot": (
            "bob",
            f"{vol}/../elsewhere/token.csv",
            volume,
            "(after resolving '..' and symbolic links) is not inside any of the job's volume mounts",
        ),
        "link": (
            "bob",
            str(vol / "link.csv"),
            volume,
            "(after resolving '..' and symbolic links) is not inside any of the job's volume mounts",
        ),
        "metadata": (
            "alice",
            metadata_server,
            scratch,
            "the URI scheme http:// is not allowed on this cluster",
        ),
    }
    rules = {
        "token": "whatever the chart allows",
        "outside": "the chart value worker.access.localPaths",
        "dotdot": "the chart value worker.access.localPaths",
        "link": "the chart value worker.access.localPaths",
        "metadata": "the chart value worker.access.schemes",
    }
    out = "/out/images"
    for name, (who, uri, workers, _) in cases.items():
        doc = tiny_job(
            name,
            str(vol / f"out-{name}") if who == "bob" else out,
            promptsFrom={"uri": uri, "format": "csv"},
            workers={"maxReplicas": 1, **workers},
        )
        proc = team.as_user(who, doc)
        assert proc.returncode == 0, f"{name} from {who}: {proc.stderr}"
    # The same operator, a prompt file inside the job's own volume: it works.
    ok = tiny_job("inside", str(vol / "out"), promptsFrom={"uri": str(vol / "prompts.txt")}, workers=volume)
    proc = team.as_user("bob", ok)
    assert proc.returncode == 0, proc.stderr
    wait_condition(kubectl, ns, "inside", "Complete", timeout=900)
    check_output_dir(vol / "out", 2)

    for name, (_, _, _, said) in cases.items():
        wait_condition(kubectl, ns, name, "Failed", timeout=600)
        failed = condition(ibj(kubectl, ns, name), "Failed")
        assert failed is not None
        message = failed["message"]
        assert f"{PROMPTS_FIELD}: " in message and said in message, f"{name}: {message}"
        assert rules[name] in message and "nothing was read" in message, f"{name}: {message}"

    # Once no worker runs, what anyone can read holds no byte of the targets: the stolen token,
    # the real tokens the workers hold (the node agent's files of their projected volumes), the
    # metadata server's answer.
    wait_for(
        "no running workers",
        lambda: all(
            p["status"].get("phase") in ("Succeeded", "Failed")
            for p in kubectl.json("get", "pods", "-n", ns)["items"]
            if p["metadata"].get("labels", {}).get("imagebatch.dev/job") in cases
        ),
        timeout=300,
    )
    assert kube_cluster.local is not None
    worker_tokens = [
        p.read_text().strip()
        for p in kube_cluster.local.node_dir.glob(f"pods/{ns}_*/volumes/imagebatch-api-access/token")
    ]
    assert worker_tokens, "no worker pod's token found on the test node"
    text = readable(kubectl, ns)
    terminated = [
        cs["state"]["terminated"].get("message", "")
        for p in kubectl.json("get", "pods", "-n", ns)["items"]
        for cs in p["status"].get("containerStatuses") or []
        if "terminated" in cs.get("state", {})
    ]
    assert any("nothing was read" in m for m in terminated), terminated
    for token in [stolen, *worker_tokens]:
        for part in token.split("."):
            assert part not in text, "a token's bytes are readable in the namespace"
    assert "eyJhbGciOi" not in text
    assert "zq-metadata-canary" not in text and "AKIAZQCANARY" not in text
    # Nothing was fetched: the metadata server was never asked.
    assert Recorder.asked == []
