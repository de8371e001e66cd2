"""The chart installs on a real cluster: Pod Security `restricted` admits the operator, its
ServiceAccount holds exactly the chart's permissions (checked by the API server's authorizer), it can
grant the workers' Role (RBAC escalation check), and the operator runs and reconciles under it.

The release watches only its own test namespace, so it never touches other tests' jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagebatch.api import ImageBatchJobSpec
from imagebatch_testing.cluster import build_binaries, create_namespace, free_port
from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/imagebatch"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/warn": "restricted",
}
JSON = dict[str, Any]


@dataclass
class Release:
    name: str
    namespace: str  # where the operator runs
    watched: str  # the one namespace it watches
    other: str  # a namespace it must not reach
    service_account: str
    notes: str
    tools: Path
    env: dict[str, str]

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.tools / tool), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=300,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc

    def create(self, doc: JSON) -> None:
        """`kubectl create -f -` as the cluster admin."""
        proc = subprocess.run(
            [str(self.tools / "kubectl"), "create", "-f", "-"],
            input=json.dumps(doc),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr

    def can_i(self, verb: str, resource: str, namespace: str | None) -> bool:
        sa = f"system:serviceaccount:{self.namespace}:{self.service_account}"
        where = ["-n", namespace] if namespace else []
        # "x/status" is a subresource: kubectl would read the part after the slash as a name.
        resource, _, sub = resource.partition("/")
        where += ["--subresource", sub] if sub else []
        proc = self.run("kubectl", "auth", "can-i", verb, resource, "--as", sa, *where, check=False)
        return proc.stdout.strip() == "yes"


@pytest.fixture(scope="module")
def release(kube_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    tools = build_binaries()
    suffix = uuid.uuid4().hex[:6]
    ns, watched, other = f"ibop-{suffix}", f"ibjobs-{suffix}", f"ibother-{suffix}"
    for name in (ns, watched, other):
        create_namespace(kube_cluster.client, name, RESTRICTED)
    cache = tmp_path_factory.mktemp("kubectl-cache")  # no discovery cache of an earlier cluster
    env = {**os.environ, "KUBECONFIG": str(kube_cluster.kubeconfig), "KUBECACHEDIR": str(cache)}
    rel = Release(f"ib{suffix}", ns, watched, other, f"ib{suffix}-imagebatch", "", tools, env)
    rel.run(
        "kubectl",
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=imagebatch-tests",
        "-f",
        str(REPO / "crds"),
    )
    deadline = time.monotonic() + 300
    while rel.run("kubectl", "get", "ibj,ibs", "-A", check=False).returncode != 0:
        assert time.monotonic() < deadline, "the CRDs are not served after 300 s"
        time.sleep(0.5)
    # The node agent runs pods on this machine's network: give the operator ports nobody uses.
    wait = ["--wait"] if kube_cluster.local is not None else []  # elsewhere the image may be missing
    proc = rel.run(
        "helm",
        "install",
        rel.name,
        str(CHART),
        "--namespace",
        ns,
        "--set",
        "watch.allNamespaces=false",
        "--set",
        f"watch.namespaces={{{watched}}}",
        "--set",
        f"metrics.port={free_port()}",
        "--set",
        f"health.port={free_port()}",
        "--set",
        "logLevel=debug",
        # The node agent cannot mount volumes: the jobs here use local folders (docs/security.md).
        "--set",
        "worker.access.localPaths=any",
        *wait,
        "--timeout",
        "3m",
    )
    rel.notes = proc.stdout
    try:
        yield rel
    finally:
        rel.run("helm", "uninstall", rel.name, "--namespace", ns, "--wait", "--timeout", "2m", check=False)
        for name in (ns, watched, other):
            kube_cluster.client.delete(f"/api/v1/namespaces/{name}")


def test_install_notes(release: Release) -> None:
    assert "STATUS: deployed" in release.notes
    assert "kubectl wait --for=condition=Complete ibj/hello" in release.notes
    assert f"watches: {release.watched}" in release.notes


def test_pod_security_restricted_admits_the_operator(release: Release) -> None:
    deployment = json.loads(
        release.run("kubectl", "-n", release.namespace, "get", "deployment", "-o", "json").stdout
    )
    (dep,) = deployment["items"]
    deadline = time.monotonic() + 300
    while True:
        pods = json.loads(
            release.run(
                "kubectl",
                "-n",
                release.namespace,
                "get",
                "pods",
                "-l",
                f"app.kubernetes.io/instance={release.name}",
                "-o",
                "json",
            ).stdout
        )["items"]
        if pods or time.monotonic() > deadline:
            break
        time.sleep(1)
    events = release.run("kubectl", "-n", release.namespace, "get", "events", "-o", "json").stdout
    assert pods, f"no operator pod (Pod Security refused it?): {events[-2000:]}"
    assert "violates PodSecurity" not in events
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


NAMESPACED = [
    ("get", "imagebatchjobs.imagebatch.dev"),
    ("watch", "imagebatchjobs.imagebatch.dev"),
    ("patch", "imagebatchjobs.imagebatch.dev/status"),
    ("create", "imagebatchshards.imagebatch.dev"),
    ("update", "imagebatchshards.imagebatch.dev/status"),
    ("create", "jobs.batch"),
    ("patch", "jobs.batch"),
    ("list", "pods"),
    ("create", "serviceaccounts"),
    ("create", "roles.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("get", "configmaps"),
    ("create", "events"),
]
DENIED = [
    ("create", "imagebatchjobs.imagebatch.dev"),  # users create jobs, not the operator
    ("delete", "pods"),
    ("create", "pods"),
    ("deletecollection", "imagebatchshards.imagebatch.dev"),  # shards go with their job (GC)
    ("update", "imagebatchshards.imagebatch.dev"),
    ("update", "imagebatchjobs.imagebatch.dev"),
    ("delete", "serviceaccounts"),
    ("delete", "roles.rbac.authorization.k8s.io"),
    ("list", "configmaps"),
    ("create", "events.events.k8s.io"),
    ("get", "secrets"),
    ("list", "secrets"),
    ("update", "configmaps"),
    ("create", "clusterroles.rbac.authorization.k8s.io"),
    ("escalate", "roles.rbac.authorization.k8s.io"),
    ("bind", "roles.rbac.authorization.k8s.io"),
]


def test_permissions_in_the_watched_namespace(release: Release) -> None:
    granted = [(v, r) for v, r in NAMESPACED if not release.can_i(v, r, release.watched)]
    assert not granted, f"missing in {release.watched}: {granted}"
    leaked = [(v, r) for v, r in DENIED if release.can_i(v, r, release.watched)]
    assert not leaked, f"more than the operator needs: {leaked}"


def test_no_permissions_elsewhere(release: Release) -> None:
    leaked = [(v, r) for v, r in NAMESPACED if release.can_i(v, r, release.other)]
    assert not leaked, f"namespaced mode reaches {release.other}: {leaked}"
    assert release.can_i("list", "customresourcedefinitions.apiextensions.k8s.io", None)
    assert release.can_i("watch", "namespaces", None)  # kopf follows the watched namespaces
    assert not release.can_i("delete", "namespaces", None)
    assert not release.can_i("create", "customresourcedefinitions.apiextensions.k8s.io", None)


def test_operator_can_grant_the_workers_role(release: Release) -> None:
    """The RBAC escalation check lets a ServiceAccount create a Role only with permissions it holds."""
    from imagebatch.operator.builders import worker_rbac

    spec = ImageBatchJobSpec.model_validate(
        {
            "model": {"name": "builtin:tiny"},
            "promptsFrom": {"configMapKeyRef": {"name": "prompts", "key": "p.txt"}},
            "output": {"uri": "out"},
        }
    )
    job = {"metadata": {"name": "grant", "namespace": release.watched, "uid": str(uuid.uuid4())}}
    objects = worker_rbac(job, spec)
    for obj in objects:
        obj["metadata"].pop("ownerReferences", None)  # the job does not exist; nothing to own
    sa = f"system:serviceaccount:{release.namespace}:{release.service_account}"
    doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    proc = subprocess.run(
        [str(release.tools / "kubectl"), "create", "-n", release.watched, "--as", sa, "-f", "-"],
        input=doc,
        capture_output=True,
        text=True,
        env=release.env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # ... and not in a namespace it does not watch.
    proc = subprocess.run(
        [str(release.tools / "kubectl"), "create", "-n", release.other, "--as", sa, "-f", "-"],
        input=doc.replace(release.watched, release.other),
        capture_output=True,
        text=True,
        env=release.env,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and "forbidden" in proc.stderr


def test_operator_runs_and_reconciles_under_the_chart(release: Release, kube_cluster: TestCluster) -> None:
    """The node agent runs the chart's command and args (images are ignored here)."""
    if kube_cluster.local is None:
        pytest.skip("needs this machine's node agent (an external cluster needs the operator image)")
    job = {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatchJob",
        "metadata": {"name": "chart-smoke", "namespace": release.watched},
        "spec": {
            "model": {"name": "builtin:tiny"},
            "prompts": ["a lighthouse"],
            "generation": {"width": 32, "height": 32, "steps": 2},
            "output": {"uri": "/tmp/imagebatch-chart-smoke"},
            "workers": {"gpusPerWorker": 0, "maxReplicas": 1},
            "suspend": True,
        },
    }
    release.create(job)
    deadline = time.monotonic() + 300
    status: JSON = {}
    while time.monotonic() < deadline:
        got = json.loads(
            release.run("kubectl", "-n", release.watched, "get", "ibj", "chart-smoke", "-o", "json").stdout
        )
        status = got.get("status") or {}
        if status.get("conditions"):
            break
        time.sleep(2)
    pods = json.loads(release.run("kubectl", "-n", release.namespace, "get", "pods", "-o", "json").stdout)[
        "items"
    ]
    logs = "\n".join(kube_cluster.pod_log(release.namespace, p["metadata"]["name"])[-3000:] for p in pods)
    assert status.get("conditions"), f"the operator wrote no status in 300 s; its log:\n{logs}"
    forbidden = [line for line in logs.splitlines() if "forbidden" in line.lower()]
    assert not forbidden, forbidden


def test_all_namespaces_rbac(release: Release) -> None:
    """All-namespaces mode, RBAC objects only (a second operator would act on other tests' jobs)."""
    name = f"{release.name}all"
    rendered = release.run(
        "helm",
        "template",
        name,
        str(CHART),
        "--namespace",
        release.namespace,
        "--show-only",
        "templates/rbac.yaml",
        "--show-only",
        "templates/serviceaccount.yaml",
    ).stdout
    apply = subprocess.run(
        [str(release.tools / "kubectl"), "apply", "-f", "-"],
        input=rendered,
        capture_output=True,
        text=True,
        env=release.env,
        timeout=60,
        check=False,
    )
    assert apply.returncode == 0, apply.stderr
    try:
        cluster_wide = Release(
            name,
            release.namespace,
            release.other,
            release.watched,
            f"{name}-imagebatch",
            "",
            release.tools,
            release.env,
        )
        for namespace in (release.watched, release.other, "default"):
            missing = [(v, r) for v, r in NAMESPACED if not cluster_wide.can_i(v, r, namespace)]
            assert not missing, f"missing in {namespace}: {missing}"
            leaked = [(v, r) for v, r in DENIED if cluster_wide.can_i(v, r, namespace)]
            assert not leaked, f"more than the operator needs in {namespace}: {leaked}"
        assert cluster_wide.can_i("watch", "namespaces", None)
        assert cluster_wide.can_i("watch", "customresourcedefinitions.apiextensions.k8s.io", None)
    finally:
        subprocess.run(
            [str(release.tools / "kubectl"), "delete", "--ignore-not-found", "-f", "-"],
            input=rendered,
            capture_output=True,
            text=True,
            env=release.env,
            timeout=60,
            check=False,
        )


def test_admission_and_network_policies_are_installed(release: Release) -> None:
    """The API server accepts the chart's policies; their CEL type-checks against the CRD schema."""
    policies = json.loads(release.run("kubectl", "get", "validatingadmissionpolicies", "-o", "json").stdout)[
        "items"
    ]
    ours = {p["metadata"]["name"]: p for p in policies if p["metadata"]["name"].startswith(release.name)}
    assert set(ours) == {f"{release.name}-imagebatch-job-creator", f"{release.name}-imagebatch-worker-fence"}
    deadline = time.monotonic() + 300
    while any("typeChecking" not in (p.get("status") or {}) for p in ours.values()):
        assert time.monotonic() < deadline, "the API server did not type-check the policies in 300 s"
        time.sleep(1)
        policies = json.loads(
            release.run("kubectl", "get", "validatingadmissionpolicies", "-o", "json").stdout
        )["items"]
        ours = {p["metadata"]["name"]: p for p in policies if p["metadata"]["name"] in ours}
    for p in ours.values():
        assert not p["status"]["typeChecking"].get("expressionWarnings"), p["status"]
    bindings = json.loads(
        release.run("kubectl", "get", "validatingadmissionpolicybindings", "-o", "json").stdout
    )["items"]
    for b in (b for b in bindings if b["metadata"]["name"] in ours):
        selector = b["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]
        assert selector["values"] == [release.watched]  # acts where the operator works, only
    for namespace, name in ((release.namespace, "imagebatch"), (release.watched, "imagebatch-workers")):
        policy = json.loads(
            release.run(
                "kubectl", "get", "networkpolicy", f"{release.name}-{name}", "-n", namespace, "-o", "json"
            ).stdout
        )
        assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_built_in_edit_and_view_roles_cover_imagebatchjobs(release: Release) -> None:
    """The chart's aggregated ClusterRoles reach users through the built-in edit and view roles."""
    ns = release.watched
    release.run(
        "kubectl", "create", "rolebinding", "carol-edit", "-n", ns, "--clusterrole=edit", "--user=carol"
    )
    release.run(
        "kubectl", "create", "rolebinding", "dave-view", "-n", ns, "--clusterrole=view", "--user=dave"
    )

    def can(user: str, verb: str, resource: str) -> bool:
        proc = release.run("kubectl", "auth", "can-i", verb, resource, "-n", ns, "--as", user, check=False)
        return proc.stdout.strip() == "yes"

    # The controller manager aggregates the rules into edit/view shortly after the install.
    deadline = time.monotonic() + 300
    while not (can("carol", "create", "imagebatchjobs.imagebatch.dev") and can("dave", "list", "ibj")):
        assert time.monotonic() < deadline, "edit/view do not cover imagebatchjobs after 300 s"
        time.sleep(1)
    assert can("carol", "delete", "imagebatchjobs.imagebatch.dev")
    assert can("carol", "list", "imagebatchshards.imagebatch.dev")
    assert not can("carol", "patch", "imagebatchshards.imagebatch.dev")  # only the operator and workers
    assert not can("dave", "create", "imagebatchjobs.imagebatch.dev")
    assert can("dave", "get", "imagebatchshards.imagebatch.dev")


def test_the_chart_with_default_values_runs_four_workers_that_all_make_images(
    release: Release, kube_cluster: TestCluster, tmp_path: Path
) -> None:
    """The README's walk: the chart as installed (its default worker metrics port, which every pod
    on the local node shares), a 10,000-prompt file job with maxReplicas 4: four workers, all of
    which make images, and READY reaches 4/4. Each worker holds after its first shard until all
    four have one, so the count does not depend on how fast workers start."""
    if kube_cluster.local is None:
        pytest.skip("needs this machine's node agent (an external cluster needs the worker image)")
    n = 10_000
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a product photograph of item {i}, studio light\n" for i in range(n)))
    marks = tmp_path / "failpoints"
    marks.mkdir()
    out = tmp_path / "out"
    env = [
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": "IMAGEBATCH_FAILPOINTS", "value": "shard-done@1=hold"},
        {"name": "IMAGEBATCH_FAILPOINT_DIR", "value": str(marks)},
    ]
    job = {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatchJob",
        "metadata": {"name": "walk", "namespace": release.watched},
        "spec": {
            "model": {"name": "builtin:tiny"},
            "promptsFrom": {"uri": str(prompts)},
            "generation": {"width": 32, "height": 32, "steps": 2},
            "batching": {"batchSize": 50, "shardSize": 250},
            "output": {"uri": str(out)},
            "workers": {"gpusPerWorker": 0, "maxReplicas": 4, "env": env},
        },
    }
    release.create(job)

    def status() -> JSON:
        got = json.loads(
            release.run("kubectl", "-n", release.watched, "get", "ibj", "walk", "-o", "json").stdout
        )
        st: JSON = got.get("status") or {}
        return st

    deadline = time.monotonic() + 900
    while len(list(marks.glob("shard-done-*.json"))) < 4:
        failed = [
            c for c in status().get("conditions") or [] if c["type"] == "Failed" and c["status"] == "True"
        ]
        assert not failed, failed
        assert time.monotonic() < deadline, f"fewer than 4 workers finished a shard in 900 s: {status()}"
        time.sleep(0.5)
    # Four workers hold after a shard each: the READY column says so.
    while status().get("ready") != "4/4":
        assert time.monotonic() < deadline, f"READY never 4/4: {status()}"
        time.sleep(0.5)
    row = release.run("kubectl", "-n", release.watched, "get", "ibj", "walk").stdout.splitlines()
    assert row[1].split()[4] == "4/4", row
    (marks / "release").write_text("")
    while not any(
        c["type"] == "Complete" and c["status"] == "True" for c in status().get("conditions") or []
    ):
        failed = [
            c for c in status().get("conditions") or [] if c["type"] == "Failed" and c["status"] == "True"
        ]
        assert not failed, failed
        assert time.monotonic() < deadline + 900, f"not complete: {status()}"
        time.sleep(1)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == n and len({line["id"] for line in lines}) == n
    workers = {line["worker"] for line in lines}
    assert len(workers) >= 4, workers
    warnings = json.loads(
        release.run(
            "kubectl",
            "-n",
            release.watched,
            "get",
            "events",
            "--field-selector",
            "type=Warning",
            "-o",
            "json",
        ).stdout
    )["items"]
    assert not [e for e in warnings if e.get("reason") == "WorkerFailed"], warnings
