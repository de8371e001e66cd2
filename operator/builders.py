"""Child objects of an ImageBatchJob, as dicts. Pure: no API calls, unit-tested.

The worker Job follows the work-queue pattern: `completions` unset, `parallelism` = the desired
worker count; each pod claims shards until none is left and then exits 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from typing import Any

from imagebatch.access import ENV_VAR as ACCESS_POLICY_ENV
from imagebatch.access import AccessPolicy
from imagebatch.api import BUILTIN_PREFIX, GROUP, ImageBatchJobSpec
from imagebatch.names import (
    EXIT_MODEL_LOAD_ERROR,
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    JOB_PLURAL,
    LABEL_COMPONENT,
    LABEL_JOB,
    SHARD_PLURAL,
    worker_account_name,
    worker_job_name,
)
from imagebatch.operator.workers import ANNOTATION_SHAPE, shape
from imagebatch.shardplan import owner_reference

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# A Kueue WorkloadPriorityClass, set on the ImageBatchJob as on any Kueue-managed object; Kueue
# reads it from the worker Job, so the Job carries it too.
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# Kueue's partial admission (beta, on by default since v0.5): a Job wider than the free quota is
# admitted with as few as this many pods (Kueue lowers `parallelism` to what it admits).
KUEUE_MIN_PARALLELISM = "kueue.x-k8s.io/job-min-parallelism"
# The Dockerfile's worker target, tagged as the chart names it: the version is the package's own.
DEFAULT_WORKER_IMAGE = f"ghcr.io/imagebatch/imagebatch-worker:{package_version('imagebatch')}"
CONTAINER = "worker"
TERMINATION_GRACE_SECONDS = 30
# Writable folders of a worker whose root file system is read-only (the worker image's HOME is
# /home/imagebatch; HF_HOME and torch's caches live under ~/.cache).
SCRATCH_MOUNTS = {"imagebatch-tmp": "/tmp", "imagebatch-cache": "/home/imagebatch/.cache"}
API_TOKEN_VOLUME = "imagebatch-api-access"
API_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
FETCH_CONTAINER = "fetch-model"
MODEL_CACHE_VOLUME = "model-cache"
MODEL_CACHE_PATH = "/var/cache/huggingface"  # HF_HOME of workers with spec.model.cache
GPUS_ENV = "IMAGEBATCH_GPUS"  # read by worker/multigpu.py: one engine process per GPU


@dataclass(frozen=True)
class WorkerSettings:
    """Operator-wide worker settings (flags of the operator)."""

    image: str = DEFAULT_WORKER_IMAGE
    command: tuple[str, ...] = ("python", "-m", "imagebatch.cli", "worker")
    fetch_command: tuple[str, ...] = ("python", "-m", "imagebatch.cli", "fetch-model")
    metrics_port: int = 0  # 0: workers serve no metrics
    run_as_user: int = 1000
    # What workers may read and write (the chart's worker.access): the strictest by default.
    access: AccessPolicy = field(default_factory=AccessPolicy)


def labels(job_name: str, component: str) -> dict[str, str]:
    return {LABEL_JOB: job_name, LABEL_COMPONENT: component, "app.kubernetes.io/name": "imagebatch"}


def _meta(
    job: dict[str, Any], name: str, component: str, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job["metadata"]["namespace"],
        "labels": {**labels(job["metadata"]["name"], component), **(extra_labels or {})},
        "ownerReferences": [owner_reference(job)],
    }


def service_account_name(job: dict[str, Any], spec: ImageBatchJobSpec) -> str:
    return spec.workers.service_account_name or worker_account_name(job["metadata"]["name"])


def worker_rbac(job: dict[str, Any], spec: ImageBatchJobSpec) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding with only what a worker of this one job needs.

    Empty when the user names their own ServiceAccount (then its permissions are theirs to give).
    """
    if spec.workers.service_account_name:
        return []
    name = worker_account_name(job["metadata"]["name"])
    rules: list[dict[str, Any]] = [
        # Its own job only: the spec it works for.
        {
            "apiGroups": [GROUP],
            "resources": [JOB_PLURAL],
            "verbs": ["get"],
            "resourceNames": [job["metadata"]["name"]],
        },
        # Claims (get; list and watch: the worker's shard cache) and the manifest-lines annotation
        # on shard 0 (patch); create because the first worker plans a prompt file's shards. The
        # API server's worker-fence policy (the chart) keeps all of it to this job's shards, which
        # RBAC cannot express.
        {
            "apiGroups": [GROUP],
            "resources": [SHARD_PLURAL],
            "verbs": ["get", "list", "watch", "create", "patch"],
        },
        # Claim, renew, complete: a conditional replace of the status.
        {"apiGroups": [GROUP], "resources": [f"{SHARD_PLURAL}/status"], "verbs": ["update"]},
    ]
    src = spec.prompts_from
    if src is not None and src.config_map_key_ref is not None:
        rules.append(
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "verbs": ["get"],
                "resourceNames": [src.config_map_key_ref.name],
            }
        )
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(job, name, "worker")},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(job, name, "worker"),
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(job, name, "worker"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": job["metadata"]["namespace"]}],
        },
    ]


def _env(job: dict[str, Any], spec: ImageBatchJobSpec, s: WorkerSettings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "JOB_NAME", "value": job["metadata"]["name"]},
        # The incarnation the pod works for: a pod of an earlier job of the same name that starts
        # after the job was re-created must not work for the new one (worker/cluster.py).
        {"name": "JOB_UID", "value": job["metadata"]["uid"]},
    ]
    env.append({"name": GPUS_ENV, "value": str(spec.workers.gpus_per_worker)})
    env += model_env(spec, read_only=True)
    # The user's env comes after ours so that it can set e.g. OMP_NUM_THREADS or HF_HOME...
    env += [dict(e) for e in spec.workers.env or []]
    # ...but not the admin's access rules: of two entries with one name the last one counts, so
    # an entry of the job's own with this name changes nothing.
    env.append({"name": ACCESS_POLICY_ENV, "value": s.access.to_env()})
    return env


# -- the model: Hugging Face token, cache volume, fetch step -------------------------------------


def model_env(spec: ImageBatchJobSpec, read_only: bool) -> list[dict[str, Any]]:
    """HF_TOKEN from the Secret; with a cache volume, HF_HOME on it (and offline for readers)."""
    env: list[dict[str, Any]] = []
    ref = spec.model.token_secret_ref
    if ref is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if spec.model.cache is not None:
        env.append({"name": "HF_HOME", "value": MODEL_CACHE_PATH})
        if read_only:
            # The fetch step (or the user) filled the cache: workers never reach the hub.
            env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    return env


def model_cache_volumes(spec: ImageBatchJobSpec) -> list[dict[str, Any]]:
    cache = spec.model.cache
    if cache is None:
        return []
    return [{"name": MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache.claim_name}}]


def model_cache_mount(read_only: bool) -> dict[str, Any]:
    return {"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_PATH, "readOnly": read_only}


def needs_fetch(spec: ImageBatchJobSpec) -> bool:
    """Only a hub model with a cache volume is fetched; built-ins and paths have nothing to fetch."""
    name = spec.model.name
    local = name.startswith((BUILTIN_PREFIX, "/", "./", "../", "~"))
    return spec.model.cache is not None and spec.model.cache.fetch and not local


def fetch_container(spec: ImageBatchJobSpec, image: str, s: WorkerSettings) -> dict[str, Any]:
    """The init container that fills the cache (what is missing only) before the engine starts."""
    args = ["--model", spec.model.name]
    if spec.model.revision:
        args += ["--revision", spec.model.revision]
    if spec.model.variant:
        args += ["--variant", spec.model.variant]
    if spec.model.pipeline:
        args += ["--pipeline", spec.model.pipeline]
    return {
        "name": FETCH_CONTAINER,
        "image": image,
        "command": list(s.fetch_command),
        "args": args,
        # Online whatever the image's defaults say: this step is the one that may reach the hub.
        "env": model_env(spec, read_only=False)
        + [{"name": "HF_HUB_OFFLINE", "value": "0"}]
        + [dict(e) for e in spec.workers.env or []],
        "volumeMounts": [model_cache_mount(read_only=False)],
        "securityContext": _container_security(),
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _resources(spec: ImageBatchJobSpec) -> dict[str, Any]:
    res: dict[str, Any] = {k: dict(v) for k, v in (spec.workers.resources or {}).items()}
    if spec.workers.gpus_per_worker > 0:
        res.setdefault("limits", {})["nvidia.com/gpu"] = spec.workers.gpus_per_worker
    return res


def harden_worker_pod(pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
    """A read-only root file system with emptyDir scratch space, and the API token mounted only
    into the worker container (not automounted into every container of the pod)."""
    container["securityContext"]["readOnlyRootFilesystem"] = True
    taken = {m.get("mountPath", "").rstrip("/") for m in container.get("volumeMounts", [])}
    volumes: list[dict[str, Any]] = pod_spec.setdefault("volumes", [])
    mounts: list[dict[str, Any]] = container.setdefault("volumeMounts", [])
    for name, path in SCRATCH_MOUNTS.items():
        if path not in taken:  # the user's own volume there wins
            volumes.append({"name": name, "emptyDir": {}})
            mounts.append({"name": name, "mountPath": path})
    pod_spec["automountServiceAccountToken"] = False
    # The same projected volume the ServiceAccount admission plugin would add to every container.
    volumes.append(
        {
            "name": API_TOKEN_VOLUME,
            "projected": {
                "defaultMode": 0o644,
                "sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                    {
                        "configMap": {
                            "name": "kube-root-ca.crt",
                            "items": [{"key": "ca.crt", "path": "ca.crt"}],
                        }
                    },
                    {
                        "downwardAPI": {
                            "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                        }
                    },
                ],
            },
        }
    )
    mounts.append({"name": API_TOKEN_VOLUME, "mountPath": API_TOKEN_PATH, "readOnly": True})


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_failure_policy(fetch: bool = False) -> dict[str, Any]:
    """`fetch`: the pod has the fetch init container (a rule may name only a container it has)."""
    rules: list[dict[str, Any]] = [
        # A user error (bad prompts, unloadable model) fails the same way on every retry.
        {
            "action": "FailJob",
            "onExitCodes": {
                "containerName": CONTAINER,
                "operator": "In",
                "values": [EXIT_USER_ERROR, EXIT_MODEL_LOAD_ERROR],
            },
        },
        # SIGTERM from scale-in, suspend or a drain: the claim was released, nothing failed.
        {
            "action": "Ignore",
            "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_TERMINATED]},
        },
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    if fetch:
        # The fetch step: a model that does not exist (or a refused token) fails on every retry.
        rules.insert(
            1,
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": FETCH_CONTAINER,
                    "operator": "In",
                    "values": [EXIT_USER_ERROR, EXIT_MODEL_LOAD_ERROR],
                },
            },
        )
    return {"rules": rules}


def worker_job(
    job: dict[str, Any],
    spec: ImageBatchJobSpec,
    parallelism: int,
    settings: WorkerSettings | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job that runs the workers."""
    s = settings or WorkerSettings()
    name = job["metadata"]["name"]
    extra = {KUEUE_QUEUE_LABEL: spec.queue_name} if spec.queue_name else {}
    job_labels = dict(extra)
    priority = (job["metadata"].get("labels") or {}).get(KUEUE_PRIORITY_LABEL)
    if spec.queue_name and priority:
        job_labels[KUEUE_PRIORITY_LABEL] = priority
    args = ["--namespace", "$(NAMESPACE)", "--job", name, "--pod", "$(POD_NAME)"]
    if s.metrics_port:
        args += ["--metrics-port", str(s.metrics_port)]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.workers.image or s.image,
        "command": list(s.command),
        "args": args,
        "env": _env(job, spec, s),
        "resources": _resources(spec),
        "securityContext": _container_security(),
        # The worker writes its fatal error there (worker/termination.py); the operator copies it
        # into the job's Failed condition. The logs' tail when a crash left nothing in it.
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.output.credentials_secret is not None:
        container["envFrom"] = [{"secretRef": {"name": spec.output.credentials_secret.name}}]
    mounts = [model_cache_mount(read_only=True)] if spec.model.cache is not None else []
    mounts += [dict(m) for m in spec.workers.volume_mounts or []]
    if mounts:
        container["volumeMounts"] = mounts
    if s.metrics_port:
        container["ports"] = [{"name": "metrics", "containerPort": s.metrics_port}]
    pod_spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(job, spec),
        # podFailurePolicy needs Never; a failed pod is replaced by the Job controller.
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": spec.workers.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": s.run_as_user,
            "runAsGroup": s.run_as_user,
            "fsGroup": s.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
    }
    volumes = model_cache_volumes(spec) + [dict(v) for v in spec.workers.volumes or []]
    if volumes:
        pod_spec["volumes"] = volumes
    if needs_fetch(spec):
        pod_spec["initContainers"] = [fetch_container(spec, container["image"], s)]
    harden_worker_pod(pod_spec, container)
    if spec.workers.node_selector:
        pod_spec["nodeSelector"] = dict(spec.workers.node_selector)
    if spec.workers.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.workers.tolerations]
    if spec.workers.priority_class_name:
        pod_spec["priorityClassName"] = spec.workers.priority_class_name
    job_spec: dict[str, Any] = {
        "parallelism": parallelism,
        # Kueue admits a Job by unsuspending it: one with a queue starts suspended.
        "suspend": bool(spec.suspend or spec.queue_name),
        # Each shard has its own attempt budget; this only stops pods that crash in a loop.
        "backoffLimit": max(2, spec.workers.max_replicas * spec.retries.max_attempts),
        "podFailurePolicy": pod_failure_policy(fetch="initContainers" in pod_spec),
        "template": {"metadata": {"labels": {**labels(name, "worker"), **extra}}, "spec": pod_spec},
    }
    # No activeDeadlineSeconds here: the operator keeps the job's deadline itself, on a clock
    # that stops while Kueue queues the Job or the job is suspended.
    meta = _meta(job, worker_job_name(name), "worker", job_labels)
    if spec.queue_name:
        meta["annotations"] = {ANNOTATION_SHAPE: shape(spec, parallelism)}
        least = max(1, spec.workers.min_replicas)
        if least < parallelism:
            meta["annotations"][KUEUE_MIN_PARALLELISM] = str(least)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
