"""Builders of the worker Job, its RBAC and the shard manifests."""

from __future__ import annotations

from typing import Any

from imagebatch.api import ImageBatchJobSpec
from imagebatch.names import ANNOTATION_ITEM_COUNT, ANNOTATION_SHARD_COUNT, LABEL_JOB, LABEL_JOB_UID
from imagebatch.operator.builders import WorkerSettings, worker_job, worker_rbac
from imagebatch.shardplan import shard_manifests

JOB: dict[str, Any] = {
    "apiVersion": "imagebatch.dev/v1alpha1",
    "kind": "ImageBatchJob",
    "metadata": {"name": "cats", "namespace": "team-a", "uid": "u-1"},
}


def spec(**over: Any) -> ImageBatchJobSpec:
    base: dict[str, Any] = {
        "model": {"name": "builtin:tiny"},
        "prompts": ["a cat"],
        "output": {"uri": "s3://b/p"},
    }
    base.update(over)
    return ImageBatchJobSpec.model_validate(base)


def test_worker_job_is_a_work_queue_with_the_desired_parallelism() -> None:
    job = worker_job(JOB, spec(), 3)
    js = job["spec"]
    assert job["kind"] == "Job" and job["metadata"]["name"] == "cats-workers"
    assert "completions" not in js and js["parallelism"] == 3
    assert js["suspend"] is False
    assert js["backoffLimit"] >= 2
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "u-1" and owner["kind"] == "ImageBatchJob" and owner["controller"] is True
    pod = js["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy needs it
    assert pod["serviceAccountName"] == "cats-worker"


def test_pod_passes_restricted_pod_security() -> None:
    pod = worker_job(JOB, spec(), 1)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # Only volume types that Pod Security `restricted` allows: no hostPath.
    allowed = {"emptyDir", "projected", "persistentVolumeClaim", "configMap", "secret", "csi"}
    assert all(set(v) - {"name"} <= allowed for v in pod["volumes"])


def test_worker_env_downward_api_and_credentials() -> None:
    s = spec(
        output={"uri": "s3://b/p", "credentialsSecret": {"name": "creds"}},
        workers={"env": [{"name": "OMP_NUM_THREADS", "value": "1"}]},
    )
    c = worker_job(JOB, s, 1)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["JOB_NAME"]["value"] == "cats"
    assert env["JOB_UID"]["value"] == "u-1"  # the incarnation the pods work for
    assert env["OMP_NUM_THREADS"]["value"] == "1"
    assert c["envFrom"] == [{"secretRef": {"name": "creds"}}]
    assert "$(POD_NAME)" in c["args"] and "cats" in c["args"]


def test_gpus_queue_deadline_and_suspend() -> None:
    s = spec(
        workers={"gpusPerWorker": 2, "resources": {"limits": {"memory": "16Gi"}}},
        queueName="gpu-queue",
        activeDeadlineSeconds=3600,
    )
    job = worker_job(JOB, s, 2)
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"] == {"memory": "16Gi", "nvidia.com/gpu": 2}
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True  # Kueue admits it by unsuspending
    # The operator keeps the deadline (paused while queued or suspended), not the Job controller.
    assert "activeDeadlineSeconds" not in job["spec"]
    no_gpu = worker_job(JOB, spec(workers={"gpusPerWorker": 0}), 1)
    assert "limits" not in no_gpu["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert worker_job(JOB, spec(suspend=True), 0)["spec"]["suspend"] is True


def test_kueue_priority_class_label_goes_to_the_worker_job() -> None:
    labelled = {**JOB, "metadata": {**JOB["metadata"], "labels": {"kueue.x-k8s.io/priority-class": "high"}}}
    job = worker_job(labelled, spec(queueName="q"), 1)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
    # Without a queue Kueue does not manage the Job: no Kueue label at all.
    plain = worker_job(labelled, spec(), 1)
    assert not [k for k in plain["metadata"]["labels"] if k.startswith("kueue.x-k8s.io/")]


def test_a_queued_worker_job_may_be_admitted_with_min_replicas() -> None:
    """Kueue's partial admission: a Job wider than the free quota starts with what fits, down to
    max(1, minReplicas); none when that is the whole Job, or without a queue."""
    key = "kueue.x-k8s.io/job-min-parallelism"
    wide = worker_job(JOB, spec(queueName="q", workers={"minReplicas": 0, "maxReplicas": 4}), 4)
    assert wide["metadata"]["annotations"][key] == "1"
    two = worker_job(JOB, spec(queueName="q", workers={"minReplicas": 2, "maxReplicas": 4}), 4)
    assert two["metadata"]["annotations"][key] == "2"
    for whole in (
        worker_job(JOB, spec(queueName="q", workers={"minReplicas": 4, "maxReplicas": 4}), 4),
        worker_job(JOB, spec(queueName="q", workers={"minReplicas": 0, "maxReplicas": 4}), 1),
        worker_job(JOB, spec(workers={"minReplicas": 1, "maxReplicas": 4}), 4),
    ):
        assert key not in (whole["metadata"].get("annotations") or {})


def test_pod_failure_policy_fails_fast_on_user_errors_and_ignores_sigterm() -> None:
    rules = worker_job(JOB, spec(), 1)["spec"]["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert fail and set(fail[0]["onExitCodes"]["values"]) == {2, 3}
    ignore_codes = [
        r["onExitCodes"]["values"] for r in rules if r["action"] == "Ignore" and "onExitCodes" in r
    ]
    assert [143] in ignore_codes


def test_worker_settings_image_and_metrics_port() -> None:
    c = worker_job(JOB, spec(), 1, WorkerSettings(image="img:1", metrics_port=9090))["spec"]["template"][
        "spec"
    ]["containers"][0]
    assert c["image"] == "img:1"
    assert c["ports"][0]["containerPort"] == 9090 and "--metrics-port" in c["args"]
    assert (
        worker_job(JOB, spec(workers={"image": "mine:2"}), 1)["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]
        == "mine:2"
    )


def test_worker_rbac_is_least_privilege() -> None:
    objs = worker_rbac(JOB, spec())
    assert [o["kind"] for o in objs] == ["ServiceAccount", "Role", "RoleBinding"]
    rules = objs[1]["rules"]
    job_rule = next(r for r in rules if r["resources"] == ["imagebatchjobs"])
    assert job_rule["verbs"] == ["get"] and job_rule["resourceNames"] == ["cats"]
    # Exactly what worker/kube.py calls: list/get shards, create (planning a prompt file), patch
    # (the manifest-lines annotation), and a conditional replace of the status; no watch, no
    # update of a shard's spec, no delete.
    shard_rule = next(r for r in rules if r["resources"] == ["imagebatchshards"])
    assert set(shard_rule["verbs"]) == {"get", "list", "watch", "create", "patch"}
    status_rule = next(r for r in rules if r["resources"] == ["imagebatchshards/status"])
    assert status_rule["verbs"] == ["update"]
    assert not any("configmaps" in r["resources"] for r in rules)
    assert not any(r.get("resources") == ["*"] or r.get("verbs") == ["*"] for r in rules)
    binding = objs[2]
    assert binding["roleRef"]["name"] == "cats-worker"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cats-worker", "namespace": "team-a"}]
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == "u-1" for o in objs)


def test_worker_rbac_reads_only_its_config_map() -> None:
    s = spec(prompts=None, promptsFrom={"configMapKeyRef": {"name": "p", "key": "k.txt"}})
    cm = [r for r in worker_rbac(JOB, s)[1]["rules"] if r["resources"] == ["configmaps"]]
    assert cm == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["p"]}]


def test_own_service_account_means_no_rbac() -> None:
    s = spec(workers={"serviceAccountName": "mine"})
    assert worker_rbac(JOB, s) == []
    assert worker_job(JOB, s, 1)["spec"]["template"]["spec"]["serviceAccountName"] == "mine"


def test_shard_manifests_cover_every_item_once() -> None:
    shards = shard_manifests(JOB, 1001, 250)
    assert [s["metadata"]["name"] for s in shards] == [f"cats-u1-s{i:05d}" for i in range(5)]
    assert [(s["spec"]["start"], s["spec"]["end"]) for s in shards] == [
        (0, 250),
        (250, 500),
        (500, 750),
        (750, 1000),
        (1000, 1001),
    ]
    for i, s in enumerate(shards):
        assert s["spec"] == {
            "jobName": "cats",
            "index": i,
            "start": s["spec"]["start"],
            "end": s["spec"]["end"],
        }
        assert s["metadata"]["labels"][LABEL_JOB] == "cats"
        assert s["metadata"]["labels"][LABEL_JOB_UID] == "u-1"
        assert s["metadata"]["annotations"][ANNOTATION_SHARD_COUNT] == "5"
        assert s["metadata"]["annotations"][ANNOTATION_ITEM_COUNT] == "1001"
        assert s["metadata"]["namespace"] == "team-a"
        assert "prompt" not in str(s["spec"])  # ranges only: prompts stay out of etcd


def test_worker_root_file_system_is_read_only_with_scratch_and_cache_folders() -> None:
    pod = worker_job(JOB, spec(), 1)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/tmp"]] == {"name": mounts["/tmp"], "emptyDir": {}}
    assert volumes[mounts["/home/imagebatch/.cache"]]["emptyDir"] == {}


def test_a_users_volume_at_tmp_replaces_the_scratch_folder() -> None:
    s = spec(
        workers={
            "volumes": [{"name": "scratch", "persistentVolumeClaim": {"claimName": "fast"}}],
            "volumeMounts": [{"name": "scratch", "mountPath": "/tmp/"}],
        }
    )
    pod = worker_job(JOB, s, 1)["spec"]["template"]["spec"]
    paths = [m["mountPath"].rstrip("/") for m in pod["containers"][0]["volumeMounts"]]
    assert paths.count("/tmp") == 1  # a duplicate mountPath would make the pod invalid
    assert "imagebatch-tmp" not in {v["name"] for v in pod["volumes"]}


def test_api_token_is_mounted_into_the_worker_container_only() -> None:
    pod = worker_job(JOB, spec(), 1)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    token = next(v for v in pod["volumes"] if "projected" in v)
    sources = token["projected"]["sources"]
    assert {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}} in sources
    (c,) = pod["containers"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == token["name"])
    assert mount == {
        "name": token["name"],
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
        "readOnly": True,
    }


def test_model_cache_token_and_fetch_step() -> None:
    s = spec(
        model={
            "name": "stabilityai/stable-diffusion-xl-base-1.0",
            "variant": "fp16",
            "cache": {"claimName": "hf-cache"},
            "tokenSecretRef": {"name": "hf"},
        },
    )
    pod = worker_job(JOB, s, 1)["spec"]["template"]["spec"]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in pod["volumes"]
    worker = pod["containers"][0]
    env = {e["name"]: e for e in worker["env"]}
    # Workers read the filled cache only: read-only, offline, HF_HOME on the volume.
    assert env["HF_HOME"]["value"] == "/var/cache/huggingface"
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}
    assert {"name": "model-cache", "mountPath": "/var/cache/huggingface", "readOnly": True} in worker[
        "volumeMounts"
    ]
    (fetch,) = pod["initContainers"]
    assert fetch["name"] == "fetch-model"
    assert fetch["args"] == ["--model", "stabilityai/stable-diffusion-xl-base-1.0", "--variant", "fp16"]
    fenv = {e["name"]: e for e in fetch["env"]}
    assert fenv["HF_HUB_OFFLINE"]["value"] == "0" and fenv["HF_HOME"]["value"] == "/var/cache/huggingface"
    assert fetch["volumeMounts"] == [
        {"name": "model-cache", "mountPath": "/var/cache/huggingface", "readOnly": False}
    ]
    rules = worker_job(JOB, s, 1)["spec"]["podFailurePolicy"]["rules"]
    assert any(r["onExitCodes"]["containerName"] == "fetch-model" for r in rules if "onExitCodes" in r)


def test_no_fetch_for_builtin_or_unset_cache_and_a_configurable_grace() -> None:
    plain = worker_job(JOB, spec(), 1)["spec"]["template"]["spec"]
    assert "initContainers" not in plain
    assert "model-cache" not in {v["name"] for v in plain["volumes"]}  # only the scratch and token volumes
    rules = worker_job(JOB, spec(), 1)["spec"]["podFailurePolicy"]["rules"]
    assert all(r["onExitCodes"]["containerName"] == "worker" for r in rules if "onExitCodes" in r)
    env = {e["name"] for e in plain["containers"][0]["env"]}
    assert not env & {"HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN"}
    assert plain["terminationGracePeriodSeconds"] == 30
    builtin = spec(model={"name": "builtin:tiny", "cache": {"claimName": "c"}})
    assert "initContainers" not in worker_job(JOB, builtin, 1)["spec"]["template"]["spec"]
    manual = spec(model={"name": "org/model", "cache": {"claimName": "c", "fetch": False}})
    assert "initContainers" not in worker_job(JOB, manual, 1)["spec"]["template"]["spec"]
    graced = spec(workers={"terminationGracePeriodSeconds": 600})
    assert worker_job(JOB, graced, 1)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 600


def test_gpu_count_reaches_the_worker() -> None:
    for gpus in (0, 1, 4):
        c = worker_job(JOB, spec(workers={"gpusPerWorker": gpus}), 1)["spec"]["template"]["spec"][
            "containers"
        ][0]
        assert {"name": "IMAGEBATCH_GPUS", "value": str(gpus)} in c["env"]


def test_every_worker_container_reports_its_fatal_error_as_its_termination_message() -> None:
    s = spec(model={"name": "org/model", "cache": {"claimName": "hf-cache"}})
    pod = worker_job(JOB, s, 1)["spec"]["template"]["spec"]
    containers = pod["containers"] + pod.get("initContainers", [])
    assert len(containers) == 2  # the worker and the model fetch step
    for c in containers:
        assert c["terminationMessagePath"] == "/dev/termination-log", c["name"]
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError", c["name"]
