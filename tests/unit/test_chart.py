"""The Helm chart: lint, rendering with default and other values, security, RBAC, values schema.

Needs the helm binary that hack/cluster/build.sh builds (cached under ~/.cache/imagebatch/bin);
without a Go toolchain to build it these tests fail, they do not skip.
"""

from __future__ import annotations

import re
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagebatch.api import ImageBatchJobSpec
from imagebatch_testing.cluster import build_binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/imagebatch"
JSON = dict[str, Any]

# What the operator may do in the namespaces it watches (resource -> verbs), and nothing more.
NAMESPACED_PERMISSIONS = {
    ("imagebatch.dev", "imagebatchjobs"): {"get", "list", "watch", "patch", "update", "delete"},
    ("imagebatch.dev", "imagebatchjobs/status"): {"get", "patch", "update"},
    ("imagebatch.dev", "imagebatchshards"): {
        "get",
        "list",
        "watch",
        "create",
        "patch",
        "update",
        "delete",
        "deletecollection",
    },
    ("imagebatch.dev", "imagebatchshards/status"): {"get", "patch", "update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "serviceaccounts"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("rbac.authorization.k8s.io", "rolebindings"): {
        "get",
        "list",
        "watch",
        "create",
        "patch",
        "update",
        "delete",
    },
    ("", "configmaps"): {"get", "list", "watch"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
CLUSTER_PERMISSIONS = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("", "namespaces"): {"get", "list", "watch"},
}

OTHER_VALUES = [
    "--set",
    "watch.allNamespaces=false",
    "--set",
    "watch.namespaces={team-a,team-b}",
    "--set",
    "logLevel=debug",
    "--set",
    "image.tag=1.2.3",
    "--set",
    "image.pullPolicy=Always",
    "--set",
    "worker.image.repository=registry.example.com:5000/gpu/worker",
    "--set",
    "worker.image.tag=cu128",
    "--set",
    "metrics.port=9100",
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "serviceAccount.name=ib-operator",
    "--set",
    "nodeSelector.pool=system",
    "--set",
    "tolerations[0].key=dedicated",
    "--set",
    "tolerations[0].operator=Exists",
    "--set",
    "podSecurityContext.runAsUser=2000",
    "--set",
    "podSecurityContext.seccompProfile.type=Unconfined",
    "--set",
    "extraArgs={--interval=5}",
    "--set",
    "imagePullSecrets[0].name=regcred",
]


@pytest.fixture(scope="module")
def helm() -> Path:
    binary = build_binaries() / "helm"
    assert binary.exists(), f"{binary} missing: hack/cluster/build.sh did not build helm"
    return binary


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, check=False)


def render(helm: Path, *values: str, namespace: str = "imagebatch-system") -> list[JSON]:
    proc = run_helm(helm, "template", "rel", str(CHART), "--namespace", namespace, *values)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(docs: list[JSON], kind: str) -> list[JSON]:
    return [d for d in docs if d["kind"] == kind]


def permissions(rules: list[JSON]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for r in rules:
        assert set(r) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule keys (resourceNames?): {r}"
        for group in r["apiGroups"]:
            for resource in r["resources"]:
                out.setdefault((group, resource), set()).update(r["verbs"])
    return out


def test_helm_lint_strict(helm: Path, tmp_path: Path) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_helm(helm, "lint", "--strict", str(CHART), *OTHER_VALUES)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_render(helm: Path) -> None:
    docs = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"
        if doc["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert doc["metadata"]["namespace"] == "imagebatch-system"
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == f"ghcr.io/imagebatch/imagebatch-operator:{version('imagebatch')}"
    assert c["command"] == ["python", "-m", "imagebatch.operator"]
    assert c["args"][0] == "--all-namespaces"
    assert "--liveness=http://0.0.0.0:8081/healthz" in c["args"]
    assert "--metrics-port=8080" in c["args"]
    assert f"--worker-image=ghcr.io/imagebatch/imagebatch-worker:{version('imagebatch')}" in c["args"]
    assert "--verbose" not in c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8081, "metrics": 8080}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == "rel-imagebatch"
    (svc,) = by_kind(docs, "Service")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert (
        dep["spec"]["selector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )
    # All-namespaces mode: the namespaced rules in a ClusterRole, bound cluster-wide.
    roles = {r["metadata"]["name"]: permissions(r["rules"]) for r in by_kind(docs, "ClusterRole")}
    assert roles == {"rel-imagebatch": NAMESPACED_PERMISSIONS, "rel-imagebatch-cluster": CLUSTER_PERMISSIONS}
    for binding in by_kind(docs, "ClusterRoleBinding"):
        assert binding["roleRef"]["name"] in roles
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "rel-imagebatch", "namespace": "imagebatch-system"}
        ]


def test_other_values_render(helm: Path) -> None:
    docs = render(helm, *OTHER_VALUES, namespace="ops")
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/imagebatch/imagebatch-operator:1.2.3" and c["imagePullPolicy"] == "Always"
    assert c["args"][:2] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--all-namespaces" not in c["args"]
    assert "--verbose" in c["args"] and c["args"][-1] == "--interval=5"
    assert "--worker-image=registry.example.com:5000/gpu/worker:cu128" in c["args"]
    assert "--metrics-port=9100" in c["args"]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["securityContext"]["runAsUser"] == 2000
    assert pod["serviceAccountName"] == "ib-operator"
    # Namespaced mode: a Role and RoleBinding in each watched namespace, no cluster-wide grants
    # beyond the CRD reads; no namespaces access.
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert permissions(role["rules"]) == NAMESPACED_PERMISSIONS
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "ib-operator", "namespace": "ops"}]
    (cluster_role,) = by_kind(docs, "ClusterRole")
    # kopf lists and watches namespaces in namespaced mode (it follows the watched ones).
    assert permissions(cluster_role["rules"]) == CLUSTER_PERMISSIONS
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (svc,) = by_kind(docs, "Service")
    assert svc["spec"]["ports"][0]["port"] == 9100


def test_metrics_off(helm: Path) -> None:
    docs = render(helm, "--set", "metrics.enabled=false", "--set", "metrics.serviceMonitor.enabled=true")
    assert not by_kind(docs, "Service") and not by_kind(docs, "ServiceMonitor")
    (dep,) = by_kind(docs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "--metrics-port=0" in c["args"] and [p["name"] for p in c["ports"]] == ["health"]


def test_no_rbac_no_service_account(helm: Path) -> None:
    docs = render(
        helm,
        "--set",
        "rbac.create=false",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=mine",
    )
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    proc = run_helm(helm, "template", "rel", str(CHART), "--set", "serviceAccount.create=false")
    assert proc.returncode != 0 and "serviceAccount.name is required" in proc.stderr


@pytest.mark.parametrize("values", [[], OTHER_VALUES], ids=["default", "other"])
def test_security_context(helm: Path, values: list[str]) -> None:
    """Pod Security `restricted`, a read-only root filesystem and a writable /tmp, whatever the values."""
    docs = render(helm, *values)
    pods = [
        d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}
    ]
    assert pods
    for pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert psc.get("runAsUser", 1) != 0
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            }
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]]


def test_every_rbac_rule_is_commented() -> None:
    """Each rule in the templates is directly under a comment that says who needs it and why."""
    for path in sorted((CHART / "templates").glob("*")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^\s*- apiGroups:", line):
                above = lines[i - 1].strip()
                assert above.startswith("#") and len(above) > 20, (
                    f"{path.name}:{i + 1}: rule without a comment"
                )


def test_operator_holds_what_it_grants_workers(helm: Path) -> None:
    """RBAC lets the operator create the workers' Role only if it holds every permission in it."""
    from imagebatch.operator.builders import worker_rbac

    held = NAMESPACED_PERMISSIONS
    spec = ImageBatchJobSpec.model_validate(
        {
            "model": {"name": "builtin:tiny"},
            "promptsFrom": {"configMapKeyRef": {"name": "cm", "key": "prompts.txt"}},
            "output": {"uri": "s3://b/p"},
        }
    )
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}}
    (role,) = [o for o in worker_rbac(job, spec) if o["kind"] == "Role"]
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                missing = set(rule["verbs"]) - held.get((group, resource), set())
                assert not missing, (
                    f"the operator grants {resource} {missing} to workers but does not hold it"
                )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "metrics.port=abc"], "/metrics/port"),
        (["--set", "logLevel=trace"], "/logLevel"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "watch.allNamespaces=yes please"], "/watch/allNamespaces"),
        (["--set", "podSecurityContext.runAsNonRoot=false"], "/podSecurityContext/runAsNonRoot"),
        (["--set", "replicaCount=2"], "replicaCount"),
        (["--set", "watch.namespaces={Team_A}"], "/watch/namespaces/0"),
        (["--set", "health.port=0"], "/health/port"),
    ],
)
def test_values_schema_rejects_bad_values(helm: Path, args: list[str], message: str) -> None:
    proc = run_helm(helm, "template", "rel", str(CHART), *args)
    assert proc.returncode != 0, f"accepted {args}"
    assert message in proc.stderr, proc.stderr


def test_watch_namespaces_required_when_not_all(helm: Path) -> None:
    proc = run_helm(helm, "template", "rel", str(CHART), "--set", "watch.allNamespaces=false")
    assert proc.returncode != 0 and "watch.namespaces must list at least one namespace" in proc.stderr


def test_chart_crds_are_the_generated_ones(helm: Path) -> None:
    names = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert names == sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    for name in names:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), name
    proc = run_helm(helm, "show", "crds", str(CHART))
    assert proc.returncode == 0, proc.stderr
    shown = sorted(d["metadata"]["name"] for d in yaml.safe_load_all(proc.stdout) if d)
    assert shown == ["imagebatchjobs.imagebatch.dev", "imagebatchshards.imagebatch.dev"]


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "imagebatch"
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version and chart["appVersion"] == version.group(1), "appVersion must follow pyproject's version"


@pytest.mark.parametrize("values", [[], OTHER_VALUES], ids=["default", "other"])
def test_operator_accepts_the_rendered_arguments(helm: Path, values: list[str]) -> None:
    from imagebatch.operator.__main__ import build_parser

    (dep,) = by_kind(render(helm, *values), "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(c["args"])
    assert args.liveness == "http://0.0.0.0:8081/healthz"
    if values:
        assert args.namespace == ["team-a", "team-b"] and args.verbose and args.metrics_port == 9100
        assert args.worker_image == "registry.example.com:5000/gpu/worker:cu128" and args.interval == 5
    else:
        assert args.all_namespaces and not args.namespace and args.metrics_port == 8080
