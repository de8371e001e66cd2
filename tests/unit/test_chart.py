"""The Helm chart: lint, rendering with default and other values, security, RBAC, values schema.

Needs the helm binary that hack/cluster/build.sh builds (cached under ~/.cache/imagebatch/bin);
without a Go toolchain to build it these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import re
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagebatch.api import ImageBatchJobSpec
from imagebatch.names import LABEL_JOB
from imagebatch.operator.builders import WorkerSettings, worker_job
from imagebatch_testing.cluster import build_binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/imagebatch"
JSON = dict[str, Any]

# What the operator may do in the namespaces it watches (resource -> verbs), and nothing more;
# test_every_granted_verb_is_used derives the same set from the code.
NAMESPACED_PERMISSIONS = {
    ("imagebatch.dev", "imagebatchjobs"): {"get", "list", "watch", "patch", "delete"},
    ("imagebatch.dev", "imagebatchjobs/status"): {"patch"},
    ("imagebatch.dev", "imagebatchshards"): {"get", "list", "watch", "create", "patch"},
    ("imagebatch.dev", "imagebatchshards/status"): {"update"},
    ("batch", "jobs"): {"get", "create", "patch", "delete"},
    ("", "pods"): {"list"},
    ("", "serviceaccounts"): {"get", "create"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "create", "patch"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "create"},
    ("", "configmaps"): {"get"},
    ("", "events"): {"create"},
    ("kueue.x-k8s.io", "localqueues"): {"get"},
    ("kueue.x-k8s.io", "workloads"): {"list"},
}
CLUSTER_SCOPED = {
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}
RBAC_KINDS = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
# Aggregated into the built-in edit/admin and view roles.
EDIT_PERMISSIONS = {
    ("imagebatch.dev", "imagebatchjobs"): {
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    },
    ("imagebatch.dev", "imagebatchjobs/status"): {"get", "list", "watch"},
    ("imagebatch.dev", "imagebatchshards"): {"get", "list", "watch"},
    ("imagebatch.dev", "imagebatchshards/status"): {"get", "list", "watch"},
}
VIEW_PERMISSIONS = {k: {"get", "list", "watch"} for k in EDIT_PERMISSIONS}
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
    "metrics.podMonitor.enabled=true",
    "--set",
    "metrics.dashboard.enabled=true",
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
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        "Deployment",
        "NetworkPolicy",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ValidatingAdmissionPolicyBinding",
    ]
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"
        if doc["kind"] not in CLUSTER_SCOPED:
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
    assert roles == {
        "rel-imagebatch": NAMESPACED_PERMISSIONS,
        "rel-imagebatch-cluster": CLUSTER_PERMISSIONS,
        "rel-imagebatch-edit": EDIT_PERMISSIONS,
        "rel-imagebatch-view": VIEW_PERMISSIONS,
    }
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
    (cluster_role,) = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("-cluster")]
    # kopf lists and watches namespaces in namespaced mode (it follows the watched ones).
    assert permissions(cluster_role["rules"]) == CLUSTER_PERMISSIONS
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # The operator's metrics name jobs by their own namespace and job labels.
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
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
    assert sorted(d["kind"] for d in docs if d["kind"] in RBAC_KINDS | {"ServiceAccount"}) == []
    assert {"Deployment", "Service"} <= {d["kind"] for d in docs}
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
            # An RBAC rule (an admission policy's resourceRules have operations, not verbs).
            if re.match(r"^\s*- apiGroups:", line) and "verbs:" in "".join(lines[i : i + 3]):
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


# -- least privilege: every verb the chart grants the operator is one its code uses ---------------

API_RESOURCES = {
    # client method suffix -> (API group, resource)
    "namespaced_job": ("batch", "jobs"),
    "namespaced_pod": ("", "pods"),
    "namespaced_service_account": ("", "serviceaccounts"),
    "namespaced_config_map": ("", "configmaps"),
    "namespaced_event": ("", "events"),
    "namespaced_role": ("rbac.authorization.k8s.io", "roles"),
    "namespaced_role_binding": ("rbac.authorization.k8s.io", "rolebindings"),
}
VERB_OF_PREFIX = {"list": "list", "read": "get", "get": "get", "create": "create", "patch": "patch"}
VERB_OF_PREFIX |= {"replace": "update", "delete": "delete"}
# What kopf itself does with the operator's token, beyond operator/kube.py: it lists and watches
# ImageBatchJobs and patches its handler-progress annotations onto them (operator/handlers.py).
KOPF_USES = {("imagebatch.dev", "imagebatchjobs"): {"list", "watch", "patch"}}
# What operator/informer.py does: it lists and watches ImageBatchShards (and nothing else).
INFORMER_USES = {("imagebatch.dev", "imagebatchshards"): {"list", "watch"}}


def operator_api_calls(path: Path = REPO / "operator/kube.py") -> dict[tuple[str, str], set[str]]:
    """(group, resource) -> verbs, read from the Kubernetes client calls in operator/kube.py."""
    import ast

    from imagebatch.names import JOB_PLURAL, SHARD_PLURAL

    plurals = {"JOB_PLURAL": JOB_PLURAL, "SHARD_PLURAL": SHARD_PLURAL, "LOCAL_QUEUE_PLURAL": "localqueues"}
    plurals["WORKLOAD_PLURAL"] = "workloads"
    groups = {
        "JOB_PLURAL": "imagebatch.dev",
        "SHARD_PLURAL": "imagebatch.dev",
        "LOCAL_QUEUE_PLURAL": "kueue.x-k8s.io",
        "WORKLOAD_PLURAL": "kueue.x-k8s.io",
    }
    tree = ast.parse(path.read_text())
    used: dict[tuple[str, str], set[str]] = {}

    def plural_of(call: ast.Call) -> str:
        names = [a.id for a in call.args if isinstance(a, ast.Name) and a.id in plurals]
        assert len(names) == 1, f"line {call.lineno}: which resource? {ast.unparse(call)}"
        return plurals[names[0]]

    def group_of(call: ast.Call) -> str:
        (name,) = [a.id for a in call.args if isinstance(a, ast.Name) and a.id in plurals]
        return groups[name]

    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)):
            continue
        api, method = node.value.attr, node.attr
        if api not in {"custom", "batch", "core", "rbac"} or node.value.value.__dict__.get("id") != "self":
            continue
        prefix, _, rest = method.partition("_")
        verb = VERB_OF_PREFIX[prefix]
        if api == "custom":
            call = calls.get(id(node))
            assert call is not None, f"line {node.lineno}: custom-object method not called directly"
            resource = plural_of(call) + ("/status" if rest.endswith("_status") else "")
            key = (group_of(call), resource)
        else:
            key = API_RESOURCES[rest]
        used.setdefault(key, set()).add(verb)
    return used


def test_every_granted_verb_is_used(helm: Path) -> None:
    """The operator's namespaced grants are exactly: what operator/kube.py calls, what kopf does,
    and what the operator must hold to grant the workers' Role (RBAC escalation check)."""
    from imagebatch.operator.builders import worker_rbac

    spec = ImageBatchJobSpec.model_validate(
        {
            "model": {"name": "builtin:tiny"},
            "promptsFrom": {"configMapKeyRef": {"name": "cm", "key": "prompts.txt"}},
            "output": {"uri": "s3://b/p"},
        }
    )
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}}
    (role,) = [o for o in worker_rbac(job, spec) if o["kind"] == "Role"]
    needed: dict[tuple[str, str], set[str]] = {}
    for source in (
        operator_api_calls(),
        operator_api_calls(REPO / "imagebatch/shardclient.py"),  # the shard client operator/kube.py uses
        KOPF_USES,
        INFORMER_USES,
        permissions([dict(r) for r in strip_names(role["rules"])]),
    ):
        for key, verbs in source.items():
            needed.setdefault(key, set()).update(verbs)
    docs = render(helm)
    (granted_role,) = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"] == "rel-imagebatch"]
    granted = permissions(granted_role["rules"])
    unused = {k: v - needed.get(k, set()) for k, v in granted.items() if v - needed.get(k, set())}
    assert not unused, f"the chart grants the operator verbs nothing uses: {unused}"
    missing = {k: v - granted.get(k, set()) for k, v in needed.items() if v - granted.get(k, set())}
    assert not missing, f"the code needs verbs the chart does not grant: {missing}"
    assert ("", "secrets") not in granted


def strip_names(rules: list[JSON]) -> list[JSON]:
    return [{k: v for k, v in r.items() if k != "resourceNames"} for r in rules]


def test_the_verb_scan_sees_a_new_call(tmp_path: Path) -> None:
    """operator_api_calls reads the code: a new call to delete Pods shows up as (pods, delete)."""
    assert "delete" not in operator_api_calls()[("", "pods")]
    extra = "\n\ndef _extra(self):\n    self.core.delete_namespaced_pod('p', 'ns')\n"
    (tmp_path / "kube.py").write_text((REPO / "operator/kube.py").read_text() + extra)
    assert "delete" in operator_api_calls(tmp_path / "kube.py")[("", "pods")]


# -- admission policies, aggregated roles, NetworkPolicy ----------------------------------------


def policies(docs: list[JSON]) -> dict[str, JSON]:
    return {d["metadata"]["name"]: d for d in by_kind(docs, "ValidatingAdmissionPolicy")}


def test_admission_policies_and_bindings(helm: Path) -> None:
    docs = render(helm)
    pol = policies(docs)
    assert set(pol) == {"rel-imagebatch-job-creator", "rel-imagebatch-worker-fence"}
    creator = pol["rel-imagebatch-job-creator"]["spec"]
    assert creator["failurePolicy"] == "Fail"
    assert creator["matchConstraints"]["resourceRules"][0]["resources"] == ["imagebatchjobs"]
    text = yaml.safe_dump(creator)
    for needed in ("check('create')", "check('use')", "resource('secrets')", "resource('configmaps')"):
        assert needed in text
    # Each message names the field it is about.
    messages = [v["messageExpression"] for v in creator["validations"]]
    for field in (
        "spec.workers.image",
        "spec.workers.serviceAccountName",
        "spec.workers.volumes[",
        "spec.workers.priorityClassName",
    ):
        assert any(field in m for m in messages), field
    refs = yaml.safe_dump(creator["variables"])
    for field in (
        "spec.output.credentialsSecret",
        "].valueFrom.secretKeyRef",
        "spec.promptsFrom.configMapKeyRef",
        "].valueFrom.configMapKeyRef",
    ):
        assert field in refs, field
    fence = pol["rel-imagebatch-worker-fence"]["spec"]
    assert fence["paramKind"] == {"apiVersion": "imagebatch.dev/v1alpha1", "kind": "ImageBatchJob"}
    assert set(fence["matchConstraints"]["resourceRules"][0]["resources"]) == {
        "imagebatchshards",
        "imagebatchshards/status",
    }
    bindings = {b["metadata"]["name"]: b["spec"] for b in by_kind(docs, "ValidatingAdmissionPolicyBinding")}
    assert {b["policyName"] for b in bindings.values()} == set(pol)
    assert all(b["validationActions"] == ["Deny"] for b in bindings.values())
    assert bindings["rel-imagebatch-worker-fence"]["paramRef"] == {
        "selector": {},
        "parameterNotFoundAction": "Allow",
    }
    assert all("matchResources" not in b for b in bindings.values())  # all namespaces


def test_admission_in_namespaced_mode_acts_in_the_watched_namespaces_only(helm: Path) -> None:
    docs = render(helm, *OTHER_VALUES)
    for b in by_kind(docs, "ValidatingAdmissionPolicyBinding"):
        assert b["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}
        ]


def test_admission_narrowed_by_the_admin(helm: Path) -> None:
    docs = render(
        helm,
        "--set",
        "admission.allowedImages={registry.example.com/imagebatch/}",
        "--set",
        "admission.allowedVolumeTypes={persistentVolumeClaim,emptyDir}",
        "--set",
        "admission.maxReferenceChecks=2",
    )
    creator = policies(docs)["rel-imagebatch-job-creator"]["spec"]
    expressions = [v["expression"] for v in creator["validations"]]
    assert any('["registry.example.com/imagebatch/"].exists(p,' in e for e in expressions)
    assert any('["persistentVolumeClaim","emptyDir"]' in e for e in expressions)
    assert sum("resource('secrets')" in e for e in expressions) == 2
    assert not policies(render(helm, "--set", "admission.enabled=false"))


def test_admission_values_are_checked(helm: Path) -> None:
    for args in (
        ["--set", "admission.allowedImages={it's}"],
        ["--set", "admission.maxReferenceChecks=50"],
        ["--set", "admission.openVolumeTypes={host path}"],
    ):
        proc = run_helm(helm, "template", "rel", str(CHART), *args)
        assert proc.returncode != 0 and "/admission/" in proc.stderr, (args, proc.stderr)


def test_aggregated_roles(helm: Path) -> None:
    roles = {r["metadata"]["name"]: r for r in by_kind(render(helm), "ClusterRole")}
    edit, view = roles["rel-imagebatch-edit"], roles["rel-imagebatch-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    # Users never write shards: only the operator and the job's own workers do.
    writes = {"create", "update", "patch", "delete", "deletecollection"}
    assert not permissions(edit["rules"])[("imagebatch.dev", "imagebatchshards")] & writes
    off = render(helm, "--set", "rbac.aggregateToDefaultRoles=false")
    assert {r["metadata"]["name"] for r in by_kind(off, "ClusterRole")} == {
        "rel-imagebatch",
        "rel-imagebatch-cluster",
    }


def test_network_policies(helm: Path) -> None:
    (op,) = by_kind(render(helm), "NetworkPolicy")
    assert op["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = op["spec"]["ingress"]  # metrics only; nothing else may connect
    assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"imagebatch.dev/monitoring": "true"}}}]
    docs = render(helm, *OTHER_VALUES, "--set", "networkPolicy.metricsFrom.namespaceLabels.team=obs")
    nps = {(n["metadata"]["namespace"], n["metadata"]["name"]): n for n in by_kind(docs, "NetworkPolicy")}
    assert set(nps) == {
        ("imagebatch-system", "rel-imagebatch"),
        ("team-a", "rel-imagebatch-workers"),
        ("team-b", "rel-imagebatch-workers"),
    }
    workers = nps[("team-a", "rel-imagebatch-workers")]["spec"]
    assert workers["podSelector"] == {"matchLabels": {"imagebatch.dev/component": "worker"}}
    (rule,) = workers["ingress"]
    assert rule["ports"] == [{"port": 9090, "protocol": "TCP"}]
    assert rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "imagebatch.dev/monitoring": "true",
        "team": "obs",
    }
    assert not by_kind(render(helm, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def worker_pod(metrics_port: int) -> JSON:
    """The pod template of a worker Job as the operator builds it."""
    job = {"metadata": {"name": "cats", "namespace": "team-a", "uid": "u-1"}}
    spec = ImageBatchJobSpec.model_validate(
        {"model": {"name": "builtin:tiny"}, "prompts": ["a cat"], "output": {"uri": "s3://b/p"}}
    )
    wj = worker_job(job, spec, 1, WorkerSettings(metrics_port=metrics_port))
    template: JSON = wj["spec"]["template"]
    return template


def test_worker_pod_monitor_selects_the_workers_metrics_port(helm: Path) -> None:
    assert not by_kind(render(helm), "PodMonitor")  # off by default: needs prometheus-operator's CRD
    docs = render(helm, "--set", "metrics.podMonitor.enabled=true", "--set", "metrics.podMonitor.labels.r=p")
    (monitor,) = by_kind(docs, "PodMonitor")
    assert monitor["metadata"]["namespace"] == "imagebatch-system"
    assert monitor["metadata"]["labels"]["r"] == "p"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    # What it selects is what operator/builders.py makes, on the port the chart passes to it.
    (dep,) = by_kind(docs, "Deployment")
    (arg,) = [
        a for a in dep["spec"]["template"]["spec"]["containers"][0]["args"] if "worker-metrics-port" in a
    ]
    pod = worker_pod(int(arg.split("=")[1]))
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert spec["jobLabel"] == LABEL_JOB and LABEL_JOB in pod["metadata"]["labels"]
    (endpoint,) = spec["podMetricsEndpoints"]
    (container,) = pod["spec"]["containers"]
    assert endpoint["port"] in {p["name"] for p in container["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "30s"
    # The pods of other components (the operator's own) are not workers.
    assert (
        not spec["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    )

    # Namespaced mode: only the watched namespaces.
    (monitor,) = by_kind(render(helm, *OTHER_VALUES), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_worker_pod_monitor_needs_worker_metrics(helm: Path) -> None:
    proc = run_helm(
        helm,
        "template",
        "rel",
        str(CHART),
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "worker.metricsPort=0",
    )
    assert proc.returncode != 0 and "worker.metricsPort" in proc.stderr


def test_grafana_dashboard_config_map(helm: Path) -> None:
    assert not by_kind(render(helm), "ConfigMap")
    shipped = json.loads((CHART / "dashboards/imagebatch.json").read_text())
    docs = render(helm, "--set", "metrics.dashboard.enabled=true")
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "imagebatch-system"
    assert json.loads(cm["data"]["imagebatch.json"]) == shipped
    docs = render(
        helm,
        "--set",
        "metrics.dashboard.enabled=true",
        "--set",
        "metrics.dashboard.namespace=monitoring",
        "--set",
        "metrics.dashboard.annotations.grafana_folder=Batch",
    )
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Batch"}
