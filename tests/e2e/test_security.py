"""Least privilege on the real API server (RBAC, the chart's ValidatingAdmissionPolicies, real
tokens): an ImageBatchJob grants nothing its creator lacks, a job's workers can write only that
job's shards, the operator holds only what it uses, and it never adopts a Role it did not make.

Users alice and bob are real to the authorizer and to admission: the admin impersonates them
(`kubectl --as`), so the policy's `authorizer` asks RBAC about alice, not about the admin.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import (
    REPO,
    TINY_ENV,
    Kubectl,
    Operator,
    check_output_dir,
    condition,
    ibj,
    tiny_job,
    wait_condition,
    wait_for,
)

from imagebatch.names import shard_name
from imagebatch_testing.cluster import build_binaries, create_namespace, free_port
from imagebatch_testing.kubeapi import ApiError, KubeClient
from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster

JSON = dict[str, Any]
CHART = REPO / "charts" / "imagebatch"
POLICY_RELEASE = "ibsec"


def helm_template(release: str, namespace: str, *args: str) -> list[JSON]:
    proc = subprocess.run(
        [str(build_binaries() / "helm"), "template", release, str(CHART), "--namespace", namespace, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def token_of(client: KubeClient, namespace: str, service_account: str) -> str:
    """A real token of a ServiceAccount (TokenRequest), as the kubelet would mount it."""
    answer = client.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        },
    )
    return str(answer["status"]["token"])


def refused(call: Any) -> ApiError:
    try:
        call()
    except ApiError as err:
        return err
    raise AssertionError("the API server accepted it")


@dataclass
class Team:
    namespace: str
    kubectl: Kubectl

    def as_user(self, user: str, doc: JSON, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.kubectl(
            "apply",
            "-n",
            self.namespace,
            "--as",
            user,
            *extra,
            "-f",
            "-",
            input=yaml.safe_dump(doc),
            check=False,
        )


@pytest.fixture(scope="module")
def team(kube_cluster: TestCluster, kubectl: Kubectl) -> Iterator[Team]:
    """Namespace team-a-…, the chart's admission policies acting in it, users alice and bob.

    No Pod Security enforcement here: bob's hostPath job must be able to run once admitted.
    alice may create ImageBatchJobs and read pods; bob may also create pods, read the Secret and
    the ConfigMap, which is what the policy asks of a job that uses them.
    """
    ns = f"team-a-{uuid.uuid4().hex[:5]}"
    create_namespace(kube_cluster.client, ns)
    policies = [
        d
        for d in helm_template(
            POLICY_RELEASE,
            "imagebatch-system",
            "--set",
            "watch.allNamespaces=false",
            "--set",
            f"watch.namespaces={{{ns}}}",
        )
        if d["kind"] in {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    ]
    assert len(policies) == 4
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(policies))
    rbac = [
        role(
            "ibj-creator",
            ns,
            [rule("imagebatch.dev", "imagebatchjobs", "create,get,list,watch,patch,update,delete")],
        ),
        role("pod-reader", ns, [rule("", "pods", "get,list,watch")]),
        role("pod-creator", ns, [rule("", "pods", "create")]),
        role("secret-reader", ns, [rule("", "secrets", "get", "registry-token")]),
        role("prompt-reader", ns, [rule("", "configmaps", "get", "prompts")]),
        binding("alice-ibj", ns, "ibj-creator", "alice"),
        binding("alice-pods", ns, "pod-reader", "alice"),
        *(
            binding(f"bob-{r}", ns, r, "bob")
            for r in ("ibj-creator", "pod-reader", "pod-creator", "secret-reader", "prompt-reader")
        ),
    ]
    kubectl.apply(rbac, ns)
    t = Team(ns, kubectl)
    # The policies act once the API server has loaded them: wait for a refusal (dry run).
    probe = tiny_job("probe", "/nowhere", prompts=["x"], workers={"image": "busybox"})
    wait_for(
        "the job-creator policy to act",
        lambda: "spec.workers.image" in t.as_user("alice", probe, "--dry-run=server").stderr,
        timeout=600,
    )
    yield t
    kubectl("delete", "-f", "-", "--ignore-not-found", input=yaml.safe_dump_all(policies), check=False)
    kubectl("delete", "namespace", ns, "--wait=false", check=False)


def rule(group: str, resource: str, verbs: str, name: str | None = None) -> JSON:
    r: JSON = {"apiGroups": [group], "resources": [resource], "verbs": verbs.split(",")}
    if name:
        r["resourceNames"] = [name]
    return r


def role(name: str, ns: str, rules: list[JSON]) -> JSON:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": ns},
        "rules": rules,
    }


def binding(name: str, ns: str, role_name: str, user: str, kind: str = "Role") -> JSON:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role_name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }


# -- 1. admission checks the creator --------------------------------------------------------------


def test_a_job_grants_nothing_its_creator_lacks(
    kube_cluster: TestCluster, kubectl: Kubectl, running_operator: Operator, team: Team, tmp_path: Path
) -> None:
    if kube_cluster.local is None:
        pytest.skip("bob's jobs run on the local node agent (hostPath, local output folders)")
    ns = team.namespace
    # A privileged ServiceAccount (cluster-admin in the namespace), a Secret, a prompt ConfigMap.
    kubectl("create", "serviceaccount", "deployer", "-n", ns)
    kubectl.apply(
        [
            {
                **binding("deployer-admin", ns, "cluster-admin", "x", kind="ClusterRole"),
                "subjects": [{"kind": "ServiceAccount", "name": "deployer", "namespace": ns}],
            }
        ],
        ns,
    )
    kubectl("create", "secret", "generic", "registry-token", "-n", ns, "--from-literal=token=s3cr3t")
    kubectl(
        "create", "configmap", "prompts", "-n", ns, "--from-literal=prompts.txt=a red door\na blue door\n"
    )

    outs = {k: tmp_path / k for k in ("hostpath", "account", "secret", "hftoken", "configmap")}
    manifests = {
        # Mounted at the host folder's own path: the test node runs workers as local processes.
        "hostpath": tiny_job(
            "hostpath",
            str(outs["hostpath"]),
            prompts=["a field", "a hill"],
            workers={
                "maxReplicas": 1,
                "volumes": [
                    {"name": "out", "hostPath": {"path": str(outs["hostpath"]), "type": "DirectoryOrCreate"}}
                ],
                "volumeMounts": [{"name": "out", "mountPath": str(outs["hostpath"])}],
            },
        ),
        "account": tiny_job(
            "account",
            str(outs["account"]),
            prompts=["a cat"],
            workers={"maxReplicas": 1, "serviceAccountName": "deployer"},
        ),
        "secret": tiny_job(
            "secret",
            str(outs["secret"]),
            prompts=["a dog"],
            workers={
                "maxReplicas": 1,
                "env": [
                    *TINY_ENV,
                    {
                        "name": "REGISTRY_TOKEN",
                        "valueFrom": {"secretKeyRef": {"name": "registry-token", "key": "token"}},
                    },
                ],
            },
        ),
        "hftoken": tiny_job(
            "hftoken",
            str(outs["hftoken"]),
            prompts=["a bird"],
            model={"name": "builtin:tiny", "tokenSecretRef": {"name": "registry-token", "key": "token"}},
            workers={"maxReplicas": 1},
        ),
        "configmap": tiny_job(
            "configmap",
            str(outs["configmap"]),
            promptsFrom={"configMapKeyRef": {"name": "prompts", "key": "prompts.txt"}},
            workers={"maxReplicas": 1},
        ),
    }
    expected = {
        "hostpath": ("spec.workers.volumes[out]", "create pods"),
        "account": (
            "spec.workers.serviceAccountName",
            "create pods, or the verb use on serviceaccounts/deployer",
        ),
        "secret": ("spec.workers.env[REGISTRY_TOKEN].valueFrom.secretKeyRef", "get secrets"),
        "hftoken": ("spec.model.tokenSecretRef", "get secrets"),
        "configmap": ("spec.promptsFrom.configMapKeyRef", "get configmaps"),
    }
    # alice may create jobs (a plain one passes, dry run) ...
    plain = tiny_job("plain", str(tmp_path / "plain"), prompts=["a tree"])
    proc = team.as_user("alice", plain, "--dry-run=server")
    assert proc.returncode == 0, proc.stderr
    # ... but none of these: the API server refuses each, naming the field and what she lacks.
    for name, doc in manifests.items():
        proc = team.as_user("alice", doc)
        field, missing = expected[name]
        assert proc.returncode != 0, f"{name}: accepted from alice"
        assert "ValidatingAdmissionPolicy" in proc.stderr and field in proc.stderr, proc.stderr
        assert "user alice" in proc.stderr and f"(missing: {missing})" in proc.stderr, proc.stderr
        assert kubectl("get", "ibj", name, "-n", ns, check=False).returncode != 0
    # A CSI volume of a driver the admin did not open (a secrets-store SecretProviderClass would
    # read a vault for her) is refused too: csi is open by driver name only.
    vault = tiny_job(
        "vault",
        "/nowhere",
        prompts=["x"],
        workers={
            "volumes": [
                {
                    "name": "v",
                    "csi": {
                        "driver": "secrets-store.csi.k8s.io",
                        "volumeAttributes": {"secretProviderClass": "team-b-vault"},
                    },
                }
            ],
            "volumeMounts": [{"name": "v", "mountPath": "/mnt/v"}],
        },
    )
    proc = team.as_user("alice", vault, "--dry-run=server")
    assert proc.returncode != 0 and "spec.workers.volumes[v]" in proc.stderr, proc.stderr
    assert "admission.openCsiDrivers" in proc.stderr and "(missing: create pods)" in proc.stderr, proc.stderr
    # bob may do each of those things directly: the same manifests pass and run.
    for name, doc in manifests.items():
        proc = team.as_user("bob", doc)
        assert proc.returncode == 0, f"{name} from bob: {proc.stderr}"
    for name in manifests:
        wait_condition(kubectl, ns, name, "Complete", timeout=900)
    check_output_dir(outs["hostpath"], {"p0000000", "p0000001"})
    check_output_dir(outs["account"], 1)
    check_output_dir(outs["secret"], 1)
    check_output_dir(outs["hftoken"], 1)
    check_output_dir(outs["configmap"], 2)
    workers = kubectl.json("get", "job", "account-workers", "-n", ns)
    assert workers["spec"]["template"]["spec"]["serviceAccountName"] == "deployer"
    # A spec change is checked again (alice edits bob's plain job to add the Secret: refused),
    # while a change that leaves the spec alone (a label) is not asked about.
    edited = copy.deepcopy(manifests["secret"])
    edited["metadata"]["labels"] = {"owner": "bob"}
    proc = team.as_user("alice", {**edited, "spec": {**edited["spec"], "suspend": True}})
    assert proc.returncode != 0 and "spec.workers.env[REGISTRY_TOKEN]" in proc.stderr, proc.stderr
    proc = kubectl("label", "ibj", "secret", "-n", ns, "--as", "alice", "reviewed=yes", check=False)
    assert proc.returncode == 0, proc.stderr


# -- 2. workers are fenced to their own job -------------------------------------------------------


def shards_and_worker_account(client: KubeClient, ns: str, b: str, a: str) -> list[JSON]:
    """Job B's planned shards, once job A's worker ServiceAccount exists too."""
    shards_path = f"/apis/imagebatch.dev/v1alpha1/namespaces/{ns}/imagebatchshards"
    b_shards: list[JSON] = wait_for(
        "job B's shards",
        lambda: client.get(shards_path, labelSelector=f"imagebatch.dev/job={b}")["items"],
        timeout=600,
    )
    wait_for(
        "job A's worker ServiceAccount",
        lambda: client.get_or_none(f"/api/v1/namespaces/{ns}/serviceaccounts/{a}-worker"),
        timeout=600,
    )
    return b_shards


def test_a_workers_token_cannot_touch_another_jobs_shards(
    kube_cluster: TestCluster, kubectl: Kubectl, running_operator: Operator, team: Team, tmp_path: Path
) -> None:
    ns = team.namespace
    client = kube_cluster.client
    shards_path = f"/apis/imagebatch.dev/v1alpha1/namespaces/{ns}/imagebatchshards"
    # Job B waits (suspended) with its shards planned; job A runs, so its worker account exists.
    # A reads a prompt file: its own worker plans (creates) A's shards, all under the fence.
    prompt_file = tmp_path / "a-prompts.txt"
    prompt_file.write_text("".join(f"prompt {i}\n" for i in range(5)))
    kubectl.apply(
        [tiny_job("fence-b", str(tmp_path / "b"), prompts=[f"b{i}" for i in range(3)], suspend=True)], ns
    )
    kubectl.apply(
        [
            tiny_job(
                "fence-a",
                str(tmp_path / "a"),
                promptsFrom={"uri": str(prompt_file)},
                batching={"shardSize": 2},
                workers={"maxReplicas": 1},
            )
        ],
        ns,
    )
    b_shards = shards_and_worker_account(client, ns, "fence-b", "fence-a")
    worker_a = client.with_token(token_of(client, ns, "fence-a-worker"))

    def rbac_allows(verb: str, subresource: str = "") -> bool:
        """Whether A's worker Role already reaches the authorizer (the operator makes it just
        after the ServiceAccount, and RBAC is served from a cache)."""
        review = worker_a.create(
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {
                    "resourceAttributes": {
                        "namespace": ns,
                        "verb": verb,
                        "group": "imagebatch.dev",
                        "resource": "imagebatchshards",
                        "subresource": subresource,
                    }
                },
            },
        )
        return bool(review["status"].get("allowed"))

    # The refusals below must come from the fence, so first RBAC must allow what they try.
    wait_for(
        "job A's worker Role in force",
        lambda: rbac_allows("update", "status") and rbac_allows("patch") and rbac_allows("create"),
        timeout=600,
    )
    b0 = next(s for s in b_shards if s["spec"]["index"] == 0)
    b0_path = f"{shards_path}/{b0['metadata']['name']}"
    fence = "may write only its own shards"

    # Mark B's shard Done (a conditional replace of the status: a verb the worker's Role holds).
    forged = copy.deepcopy(b0)
    forged["status"] = {**(b0.get("status") or {}), "state": "Done", "itemsDone": 3}
    err = refused(lambda: worker_a.replace(f"{b0_path}/status", forged))
    assert err.status == 403 and fence in err.message, err
    # Annotate B's shard 0 with a manifest line count (patch: held by the Role too).
    err = refused(
        lambda: worker_a.patch(b0_path, {"metadata": {"annotations": {"imagebatch.dev/manifest-lines": "3"}}})
    )
    assert err.status == 403 and fence in err.message, err
    # Create a shard for job B.
    extra = {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatchShard",
        "metadata": {
            "name": "fence-b-s00099",
            "labels": b0["metadata"]["labels"],
            "annotations": b0["metadata"].get("annotations", {}),
            "ownerReferences": b0["metadata"]["ownerReferences"],
        },
        "spec": {**b0["spec"], "index": 99},
    }
    err = refused(lambda: worker_a.create(shards_path, extra))
    assert err.status == 403 and fence in err.message, err
    # Nor can it pass a shard off as its own: relabelling B's shard is a change of labels.
    relabel = {"metadata": {"labels": {"imagebatch.dev/job": "fence-a"}}}
    err = refused(lambda: worker_a.patch(b0_path, relabel))
    assert err.status == 403, err
    # Outside the fence the same token still works: the refusals above are the policy, not RBAC.
    a_shards = wait_for(
        "job A's shards, planned by its worker",
        lambda: client.get(shards_path, labelSelector="imagebatch.dev/job=fence-a")["items"],
        timeout=600,
    )
    a_path = f"{shards_path}/{a_shards[0]['metadata']['name']}"
    worker_a.patch(a_path, {"metadata": {"annotations": {"example.com/fence-probe": "ok"}}})
    err = refused(lambda: worker_a.delete(a_path))
    assert err.status == 403

    # Job B runs and completes untouched.
    assert client.get(b0_path).get("status") == b0.get("status")
    kubectl("patch", "ibj", "fence-b", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_condition(kubectl, ns, "fence-b", "Complete", timeout=300)
    wait_condition(kubectl, ns, "fence-a", "Complete", timeout=300)
    check_output_dir(tmp_path / "a", 5)  # planned, claimed, completed and joined by A's workers
    check_output_dir(tmp_path / "b", 3)
    assert ibj(kubectl, ns, "fence-b")["status"]["items"] == {"total": 3, "done": 3, "failed": 0}
    names = {
        s["metadata"]["name"]
        for s in client.get(shards_path, labelSelector="imagebatch.dev/job=fence-b")["items"]
    }
    assert "fence-b-s00099" not in names


# -- 3. the operator's own token ------------------------------------------------------------------


def test_the_operators_token_cannot_read_secrets_or_make_pods(
    kube_cluster: TestCluster, kubectl: Kubectl, operator: Operator, team: Team
) -> None:
    ns = team.namespace
    kubectl("create", "secret", "generic", "operator-probe", "-n", ns, "--from-literal=k=v", check=False)
    op = KubeClient.from_kubeconfig(operator.kubeconfig)
    me = op.create(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )["status"]["userInfo"]["username"]
    assert me.startswith("system:serviceaccount:imagebatch-system:"), me
    for path in (
        f"/api/v1/namespaces/{ns}/secrets",
        f"/api/v1/namespaces/{ns}/secrets/operator-probe",
        "/api/v1/secrets",
        "/api/v1/namespaces/kube-system/secrets",
    ):
        err = refused(lambda p=path: op.get(p))  # type: ignore[misc]
        assert err.status == 403, (path, err)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "c", "image": "i"}]},
    }
    err = refused(lambda: op.request("POST", f"/api/v1/namespaces/{ns}/pods", pod, query={"dryRun": "All"}))
    assert err.status == 403, err


# -- 5. a Role of the workers' name that the job does not own -------------------------------------


def test_a_foreign_role_named_like_the_workers_is_never_adopted(
    kubectl: Kubectl, running_operator: Operator, team: Team, tmp_path: Path
) -> None:
    ns = team.namespace
    kubectl.apply([role("squat-worker", ns, [rule("", "pods", "get")])], ns)
    before = kubectl.json("get", "role", "squat-worker", "-n", ns)
    kubectl.apply([tiny_job("squat", str(tmp_path / "out"), prompts=["a"])], ns)
    wait_condition(kubectl, ns, "squat", "Failed", timeout=600)
    failed = condition(ibj(kubectl, ns, "squat"), "Failed")
    assert failed is not None and failed["reason"] == "WorkerRBACNotOwned", failed
    assert f"Role {ns}/squat-worker exists and is not owned by ImageBatchJob squat" in failed["message"]
    after = kubectl.json("get", "role", "squat-worker", "-n", ns)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["rules"] == before["rules"] and not after["metadata"].get("ownerReferences")
    assert kubectl("get", "job", "squat-workers", "-n", ns, check=False).returncode != 0  # no workers ran
    assert kubectl("get", "rolebinding", "squat-worker", "-n", ns, check=False).returncode != 0


# -- 4. watchNamespaces: an operator that can act in its namespaces only --------------------------


class NamespacedOperator(Operator):
    """The operator watching only `namespaces`, as the chart's namespaced mode runs it."""

    def __init__(self, kubeconfig: Path, log_dir: Path, namespaces: list[str]) -> None:
        super().__init__(kubeconfig, log_dir)
        self.namespaces = namespaces

    def start(self) -> None:
        self.starts += 1
        self.metrics_port = free_port()
        log = open(self.log_dir / f"operator-{self.starts}.log", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-P",
                "-m",
                "imagebatch.operator",
                *(f"--namespace={n}" for n in self.namespaces),
                "--interval=1",
                f"--metrics-port={self.metrics_port}",
                "--worker-metrics-port=0",
                *self.access,
            ],
            cwd=self.log_dir,
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_watch_namespaces_operator_reconciles_there_and_cannot_act_elsewhere(
    kube_cluster: TestCluster, kubectl: Kubectl, operator: Operator, team: Team, tmp_path: Path
) -> None:
    client = kube_cluster.client
    suffix = uuid.uuid4().hex[:5]
    home, watched = f"ibns-system-{suffix}", f"ibns-team-{suffix}"
    for name in (home, watched):
        create_namespace(client, name, {"pod-security.kubernetes.io/enforce": "restricted"})
    release = f"ibns{suffix}"
    docs = [
        d
        for d in helm_template(
            release,
            home,
            "--set",
            "watch.allNamespaces=false",
            "--set",
            f"watch.namespaces={{{watched}}}",
            "--show-only",
            "templates/rbac.yaml",
            "--show-only",
            "templates/serviceaccount.yaml",
        )
    ]
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    sa = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
    token = token_of(client, home, sa)
    admin = yaml.safe_load(kubectl.kubeconfig.read_text())
    cluster = admin["clusters"][0]
    config = tmp_path / "kubeconfig"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": sa, "user": {"token": token}}],
                "contexts": [{"name": "op", "context": {"cluster": cluster["name"], "user": sa}}],
                "current-context": "op",
            }
        )
    )
    # The session's all-namespaces operator steps aside, so that only this one can do the work.
    operator.stop()
    (tmp_path / "log").mkdir()
    ns_operator = NamespacedOperator(config, tmp_path / "log", [watched])
    ns_operator.start()
    try:
        kubectl.apply(
            [tiny_job("scoped", str(tmp_path / "out"), prompts=["a", "b"], workers={"maxReplicas": 1})],
            watched,
        )
        wait_condition(kubectl, watched, "scoped", "Complete", timeout=300)
        check_output_dir(tmp_path / "out", 2)
        # With its own token: a worker Job in the watched namespace is allowed (dry run) ...
        op = client.with_token(token)
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "probe"},
            "spec": {
                "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}
            },
        }
        op.request("POST", f"/apis/batch/v1/namespaces/{watched}/jobs", job, query={"dryRun": "All"})
        # ... and refused everywhere else, kube-system included.
        for other in ("kube-system", "default", team.namespace, home):
            err = refused(
                lambda o=other: op.request(  # type: ignore[misc]
                    "POST", f"/apis/batch/v1/namespaces/{o}/jobs", job, query={"dryRun": "All"}
                )
            )
            assert err.status == 403, (other, err)
            err = refused(
                lambda o=other: op.get(f"/apis/imagebatch.dev/v1alpha1/namespaces/{o}/imagebatchjobs")
            )  # type: ignore[misc]
            assert err.status == 403, (other, err)
        assert "forbidden" not in ns_operator.log().lower(), ns_operator.log()[-3000:]
    finally:
        ns_operator.stop()
        operator.start()
        kubectl("delete", "-f", "-", "--ignore-not-found", input=yaml.safe_dump_all(docs), check=False)
        for name in (home, watched):
            kubectl("delete", "namespace", name, "--wait=false", check=False)


# -- 4. one tenant cannot stop, fail or delay another --------------------------------------------


def nested(depth: int) -> str:
    """JSON nested `depth` levels deep, written by hand (json.dumps would hit Python's recursion
    limit, as kopf's watch decoder once did on such an object)."""
    return '{"a":' * depth + "1" + "}" * depth


def test_a_hostile_job_is_refused_or_pruned_and_the_operator_serves_everyone(
    kube_cluster: TestCluster,
    kubectl: Kubectl,
    running_operator: Operator,
    team: Team,
    namespace: str,
    tmp_path: Path,
) -> None:
    client = kube_cluster.client
    jobs = f"/apis/imagebatch.dev/v1alpha1/namespaces/{team.namespace}/imagebatchjobs"
    starts = running_operator.starts

    def post(name: str, spec_json: str, validation: str) -> tuple[int, str]:
        doc = (
            '{"apiVersion": "imagebatch.dev/v1alpha1", "kind": "ImageBatchJob", '
            f'"metadata": {{"name": "{name}"}}, "spec": {spec_json}}}'
        )
        return client.send_raw("POST", jobs, doc.encode(), {"fieldValidation": validation})

    base = '"model": {"name": "builtin:tiny"}, "output": {"uri": "/nowhere"}, "suspend": true'
    deep = nested(2500)
    hostile = {
        # Unknown fields anywhere: refused under strict validation (kubectl's default) ...
        "deep-extra-strict": (f'{{{base}, "promptItems": [{{"prompt": "x", "extra": {deep}}}]}}', "Strict"),
        # ... a value of the wrong type, however deep: refused whatever the validation.
        "deep-seed": (f'{{{base}, "promptItems": [{{"prompt": "x", "seed": {deep}}}]}}', "Ignore"),
        "deep-env": (
            f'{{{base}, "prompts": ["x"], "workers": {{"env": [{{"name": "A", "valueFrom": {deep}}}]}}}}',
            "Ignore",
        ),
        "deep-prompt": (f'{{{base}, "prompts": [{deep}]}}', "Ignore"),
        "huge-prompt": (f'{{{base}, "prompts": ["{"x" * 100_000}"]}}', "Ignore"),
    }
    for name, (spec, validation) in hostile.items():
        status, answer = post(name, spec, validation)
        # 400 (strict decoding: an unknown field) or 422 (the schema): refused, naming the field.
        assert status in (400, 422) and "spec." in answer, f"{name}: {status} {answer[:300]}"
        assert client.get_or_none(f"{jobs}/{name}") is None, name
    # Without strict validation an unknown field is pruned: what is stored holds no nesting at all.
    status, answer = post(
        "deep-extra", f'{{{base}, "promptItems": [{{"prompt": "x", "extra": {deep}}}]}}', "Ignore"
    )
    assert status == 201, answer[:300]
    stored = client.get(f"{jobs}/deep-extra")
    assert stored["spec"]["promptItems"] == [{"prompt": "x"}]

    # Another tenant's job, created after, completes; the operator process never restarted.
    out = tmp_path / "bob"
    kubectl.apply([tiny_job("bob-after", str(out), prompts=["a", "b"])], namespace)
    wait_condition(kubectl, namespace, "bob-after", "Complete", timeout=600)
    check_output_dir(out, 2)
    assert running_operator.starts == starts and running_operator.proc is not None
    assert running_operator.proc.poll() is None, "the operator exited"
    suspended = ibj(kubectl, team.namespace, "deep-extra")
    assert condition(suspended, "Suspended") is not None, suspended.get("status")


def test_a_workers_token_cannot_forge_a_shard_even_with_rbac_out_of_the_way(
    kube_cluster: TestCluster, kubectl: Kubectl, running_operator: Operator, team: Team, tmp_path: Path
) -> None:
    """The fence's own rules (RBAC widened to every shard verb for job A's workers), and the
    operator, which ignores a forged shard (an admin's, say) instead of counting it."""
    ns = team.namespace
    client = kube_cluster.client
    shards_path = f"/apis/imagebatch.dev/v1alpha1/namespaces/{ns}/imagebatchshards"
    kubectl.apply(
        [
            tiny_job(
                "forge-b", str(tmp_path / "b"), prompts=["b0", "b1"], batching={"shardSize": 1}, suspend=True
            )
        ],
        ns,
    )
    kubectl.apply([tiny_job("forge-a", str(tmp_path / "a"), prompts=["a0"], workers={"maxReplicas": 1})], ns)
    b_shards = shards_and_worker_account(client, ns, "forge-b", "forge-a")
    a_uid = ibj(kubectl, ns, "forge-a")["metadata"]["uid"]
    b = ibj(kubectl, ns, "forge-b")
    b_uid = b["metadata"]["uid"]
    # RBAC out of the way: A's workers may do anything to shards; only the fence is left.
    kubectl.apply(
        [
            role(
                "shards-all",
                ns,
                [
                    rule("imagebatch.dev", "imagebatchshards", "*"),
                    rule("imagebatch.dev", "imagebatchshards/status", "*"),
                ],
            ),
            {
                **binding("forge-a-shards-all", ns, "shards-all", "x"),
                "subjects": [{"kind": "ServiceAccount", "name": "forge-a-worker", "namespace": ns}],
            },
        ],
        ns,
    )
    worker_a = client.with_token(token_of(client, ns, "forge-a-worker"))
    fence = "may write only its own shards"

    def shard(name: str, job: str, uid_label: str, owners: list[tuple[str, str]]) -> JSON:
        b0 = b_shards[0]
        return {
            "apiVersion": "imagebatch.dev/v1alpha1",
            "kind": "ImageBatchShard",
            "metadata": {
                "name": name,
                "labels": {
                    "imagebatch.dev/job": job,
                    "imagebatch.dev/job-uid": uid_label,
                    "imagebatch.dev/component": "shard",
                },
                "annotations": b0["metadata"].get("annotations", {}),
                "ownerReferences": [
                    {"apiVersion": "imagebatch.dev/v1alpha1", "kind": "ImageBatchJob", "name": n, "uid": u}
                    for n, u in owners
                ],
            },
            "spec": {**b0["spec"], "jobName": job, "index": 7},
        }

    a_name = shard_name("forge-a", a_uid, 7)
    forgeries = {
        "a second owner": shard(a_name, "forge-a", a_uid, [("forge-a", a_uid), ("forge-b", b_uid)]),
        "another job's UID label": shard(a_name, "forge-a", b_uid, [("forge-a", a_uid)]),
        "another job's name prefix": shard(
            shard_name("forge-b", b_uid, 7), "forge-a", a_uid, [("forge-a", a_uid)]
        ),
        "another job's owner": shard(a_name, "forge-a", a_uid, [("forge-b", b_uid)]),
    }
    # RBAC allows the create now (a dry run as A's workers of A's own shard proves it) ...
    wait_for(
        "the widened Role in force",
        lambda: worker_a.request(
            "POST",
            shards_path,
            shard(shard_name("forge-a", a_uid, 8), "forge-a", a_uid, [("forge-a", a_uid)]),
            query={"dryRun": "All"},
        ),
        timeout=600,
    )
    # ... and the fence refuses every forgery.
    for what, doc in forgeries.items():
        err = refused(lambda doc=doc: worker_a.create(shards_path, doc))  # type: ignore[misc]
        assert err.status == 403 and fence in err.message, (what, err)
    b0_path = f"{shards_path}/{b_shards[0]['metadata']['name']}"
    err = refused(
        lambda: worker_a.patch(f"{b0_path}/status", {"status": {"state": "Failed", "error": "forged"}})
    )
    assert err.status == 403 and fence in err.message, err

    # A forged shard that exists anyway (made by someone the fence does not hold, the admin here):
    # labelled as B's, Failed, with a second owner. A restarted operator lists every shard afresh
    # (that is when the forgery once counted); B ignores it, says so, and completes.
    forged = shard(
        shard_name("forge-b", b_uid, 9), "forge-b", b_uid, [("forge-a", a_uid), ("forge-b", b_uid)]
    )
    client.create(shards_path, forged)
    client.patch(
        f"{shards_path}/{forged['metadata']['name']}/status",
        {"status": {"state": "Failed", "error": "forged by A"}},
    )
    running_operator.kill()
    running_operator.start()
    kubectl("patch", "ibj", "forge-b", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_condition(kubectl, ns, "forge-b", "Complete", timeout=600)
    check_output_dir(tmp_path / "b", 2)
    done = ibj(kubectl, ns, "forge-b")["status"]
    assert done["items"] == {"total": 2, "done": 2, "failed": 0} and done["shards"]["failed"] == 0, done
    events = kubectl.json("get", "events", "-n", ns, "--field-selector", "involvedObject.name=forge-b")[
        "items"
    ]
    assert any(
        e["reason"] == "ForgedShardIgnored" and forged["metadata"]["name"] in e["message"] for e in events
    )


def test_a_huge_plan_in_one_namespace_does_not_delay_another(
    kube_cluster: TestCluster,
    kubectl: Kubectl,
    running_operator: Operator,
    team: Team,
    namespace: str,
    tmp_path: Path,
) -> None:
    client = kube_cluster.client

    def run_small(name: str) -> float:
        out = tmp_path / name
        started = time.monotonic()
        kubectl.apply([tiny_job(name, str(out), prompts=["a", "b"], workers={"maxReplicas": 1})], namespace)
        wait_condition(kubectl, namespace, name, "Complete", timeout=900)
        check_output_dir(out, 2)
        return time.monotonic() - started

    idle = run_small("small-idle")
    # Alice's suspended job plans 20,000 one-item shards (10,000 prompts, 2 images each).
    kubectl.apply(
        [
            tiny_job(
                "huge",
                "/nowhere",
                prompts=[f"p{i}" for i in range(10_000)],
                generation={"imagesPerPrompt": 2},
                batching={"shardSize": 1},
                suspend=True,
            )
        ],
        team.namespace,
    )
    shards = f"/apis/imagebatch.dev/v1alpha1/namespaces/{team.namespace}/imagebatchshards"

    def planned() -> int:
        return len(client.get(shards, labelSelector="imagebatch.dev/job=huge", limit=20_000)["items"])

    wait_for("the huge plan under way", lambda: planned() >= 100, timeout=600)
    busy = run_small("small-busy")
    during = planned()
    assert during < 20_000, "the huge plan ended before the small job: this run shows nothing"
    assert busy <= 2 * idle, f"a small job took {busy:.0f} s beside a huge plan, {idle:.0f} s alone"
    kubectl("delete", "ibj", "huge", "-n", team.namespace, "--wait=false")
