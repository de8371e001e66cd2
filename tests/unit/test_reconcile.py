"""One reconcile pass against a fake API: what it creates, scales and reports."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from imagebatch.names import ANNOTATION_MANIFEST_LINES, LABEL_JOB, LABEL_JOB_UID
from imagebatch.operator.kube import NotOwnedError, check_owned
from imagebatch.operator.reconcile import Reconciler
from imagebatch.shardplan import forgery, of_incarnation, shard_manifests

JSON = dict[str, Any]


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], JSON] = {}
        self.shards: dict[str, JSON] = {}
        self.job: JSON | None = None
        self.pods: list[JSON] = []
        self.status: JSON | None = None
        self.events: list[tuple[str, str]] = []
        self.deleted: list[str] = []
        self.local_queue: bool | None = True
        self.informer_behind = False
        self.patches: list[JSON] = []

    def create(self, obj: JSON) -> bool:
        obj = copy.deepcopy(obj)
        obj["metadata"].setdefault("resourceVersion", "1")
        if obj["kind"] == "ImageBatchShard":
            if obj["metadata"]["name"] in self.shards:
                return False
            obj.setdefault("apiVersion", "imagebatch.dev/v1alpha1")
            self.shards[obj["metadata"]["name"]] = obj
        elif obj["kind"] == "Job":
            if self.job is not None:
                return False
            obj["status"] = {}
            self.job = obj
        else:
            self.objects[(obj["kind"], obj["metadata"]["name"])] = obj
        return True

    def ensure_owned(self, obj: JSON) -> None:
        existing = self.objects.get((obj["kind"], obj["metadata"]["name"]))
        if existing is None:
            self.create(obj)
            return
        owner = obj["metadata"]["ownerReferences"][0]
        check_owned(existing, obj["kind"], "ns", owner["name"], owner["uid"])

    def create_shard(self, obj: JSON) -> bool:
        existing = self.shards.get(obj["metadata"]["name"])
        if existing is not None and not of_incarnation(
            existing, obj["metadata"]["ownerReferences"][0]["uid"]
        ):
            raise NotOwnedError("ImageBatchShard", "ns", obj["metadata"]["name"], "j")
        return self.create(obj)

    def forged_shards(self, uid: str) -> dict[str, str]:
        """As OperatorKube: shards with the job's UID label that are not its shards by their other names."""
        out = {}
        for name, s in self.shards.items():
            why = forgery(s, uid)
            if why is not None and (s["metadata"].get("labels") or {}).get(LABEL_JOB_UID) == uid:
                out[name] = why
        return out

    def list_shards(self, ns: str, job: str, uid: str, fresh: bool = False) -> list[JSON]:
        if self.informer_behind and not fresh:
            return []  # an informer that has not seen the shards yet
        # As the API server's label selection: the shards of every incarnation are stored here.
        return [
            copy.deepcopy(s)
            for s in self.shards.values()
            if s["metadata"]["labels"].get(LABEL_JOB) == job
            and s["metadata"]["labels"].get(LABEL_JOB_UID) == uid
        ]

    def replace_shard_status(self, shard: JSON, status: JSON) -> bool:
        self.shards[shard["metadata"]["name"]]["status"] = status
        return True

    def get_worker_job(self, ns: str, name: str) -> JSON | None:
        return copy.deepcopy(self.job)

    def patch_worker_job(self, ns: str, name: str, patch: JSON) -> None:
        assert self.job is not None
        self.patches.append(patch)
        self.job["spec"].update(patch["spec"])

    def delete_worker_job(self, ns: str, name: str) -> None:
        self.deleted.append(name)
        self.job = None

    def list_worker_pods(self, ns: str, job: str) -> list[JSON]:
        return self.pods

    def local_queue_exists(self, ns: str, name: str) -> bool | None:
        return self.local_queue

    def worker_workloads(self, ns: str, name: str) -> list[JSON]:
        return []

    def read_config_map_key(self, ns: str, name: str, key: str) -> str | None:
        return None

    def post_event(self, job: JSON, type_: str, reason: str, message: str) -> None:
        self.events.append((reason, message))

    def patch_job_status(self, ns: str, name: str, status: JSON) -> None:
        self.status = status

    def delete_job(self, ns: str, name: str) -> None:
        self.deleted.append(name)


def job(**spec: Any) -> JSON:
    base: JSON = {
        "model": {"name": "builtin:tiny"},
        "prompts": [f"p{i}" for i in range(10)],
        "batching": {"shardSize": 2},
        "output": {"uri": "/out"},
        "workers": {"maxReplicas": 4, "shardsPerReplica": 1},
    }
    base.update(spec)
    return {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatchJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": base,
    }


def passes(kube: FakeKube, body: JSON, n: int = 1) -> JSON:
    r = Reconciler(kube)  # type: ignore[arg-type]
    for _ in range(n):
        if kube.status is not None:
            body = {**body, "status": kube.status}
        r.reconcile(body)
    assert kube.status is not None
    return kube.status


def cond(status: JSON, type_: str) -> JSON:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_first_pass_plans_shards_rbac_and_the_worker_job() -> None:
    kube = FakeKube()
    status = passes(kube, job())
    assert len(kube.shards) == 5
    assert {k for k, _ in kube.objects} == {"ServiceAccount", "Role", "RoleBinding"}
    assert kube.job is not None and kube.job["spec"]["parallelism"] == 4
    assert status["progress"] == "0/10" and status["items"]["total"] == 10
    assert cond(status, "Reconciling")["status"] == "True"
    assert status["observedGeneration"] == 1
    assert [r for r, _ in kube.events] == ["CreatedShards", "ScaledUp"]


def test_shards_the_informer_has_not_seen_yet_are_not_planned_again() -> None:
    kube = FakeKube()
    body = job()
    passes(kube, body)
    kube.informer_behind = True
    created = len(kube.events)
    status = passes(kube, body)
    assert [r for r, _ in kube.events[created:]] == []  # no second CreatedShards (nor ScaledUp)
    assert status["shards"]["total"] == 5


def test_all_done_and_joined_is_complete_with_zero_workers() -> None:
    kube = FakeKube()
    body = job()
    passes(kube, body)
    for s in kube.shards.values():
        s["status"] = {"state": "Done", "attempt": 1, "leaseRenewTime": "2026-01-01T00:00:00Z"}
    status = passes(kube, body)
    assert cond(status, "Complete")["status"] == "False"  # the manifest is not joined yet
    assert cond(status, "Reconciling")["reason"] == "Joining"
    # Damped scale-down (at most 2 a step), but at least one worker to join the manifest.
    assert kube.job is not None and kube.job["spec"]["parallelism"] == 2
    kube.shards["j-u-s00000"]["metadata"]["annotations"][ANNOTATION_MANIFEST_LINES] = "10"
    status = passes(kube, body)
    assert cond(status, "Complete")["status"] == "True" and cond(status, "Ready")["status"] == "True"
    assert status["manifest"] == "/out/manifest.jsonl" and status["progress"] == "10/10"
    assert kube.job["spec"]["parallelism"] == 0
    assert ("Completed", "10 images; manifest at /out/manifest.jsonl") in kube.events


@pytest.mark.parametrize(
    ("error", "reason", "in_message"),
    [
        ("ModelLoadError: spec.model.name: cannot load model 'x'", "ModelLoadError", "cannot load model 'x'"),
        ("worker pod w is gone (attempt 3)", "ShardsFailed", "1 of 5 shards (2 images) failed"),
    ],
)
def test_a_failed_shard_fails_the_job_and_stops_the_workers(error: str, reason: str, in_message: str) -> None:
    kube = FakeKube()
    body = job()
    passes(kube, body)
    kube.shards["j-u-s00003"]["status"] = {"state": "Failed", "attempt": 3, "error": error}
    status = passes(kube, body)
    failed = cond(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == reason and in_message in failed["message"]
    assert cond(status, "Stalled")["status"] == "True"
    assert kube.job is not None and kube.job["spec"]["parallelism"] == 0


def test_claim_of_a_gone_pod_is_requeued() -> None:
    kube = FakeKube()
    body = job()
    passes(kube, body)
    kube.shards["j-u-s00001"]["status"] = {
        "state": "Claimed",
        "attempt": 1,
        "holder": "dead-pod",
        "leaseRenewTime": "2099-01-01T00:00:00Z",
    }
    status = passes(kube, body)
    assert kube.shards["j-u-s00001"]["status"]["state"] == "Pending"
    assert kube.shards["j-u-s00001"]["status"]["attempt"] == 1
    assert status["shards"]["pending"] == 5
    assert any(r == "HolderGone" for r, _ in kube.events)


def test_suspend_scales_to_zero_and_suspends_the_job() -> None:
    kube = FakeKube()
    passes(kube, job())
    status = passes(kube, job(suspend=True))
    assert (
        kube.job is not None and kube.job["spec"]["parallelism"] == 0 and kube.job["spec"]["suspend"] is True
    )
    assert cond(status, "Suspended")["status"] == "True"


def test_deadline_exceeded_fails_the_job() -> None:
    kube = FakeKube()
    body = job(activeDeadlineSeconds=5)
    body["status"] = {"startTime": "2020-01-01T00:00:00Z", "runningSince": "2020-01-01T00:00:00Z"}
    status = passes(kube, body)
    assert cond(status, "Failed")["reason"] == "DeadlineExceeded"
    assert status["state"] == "Failed" and status["reason"] == "DeadlineExceeded"


def admit(kube: FakeKube) -> None:
    """What Kueue does when it admits the worker Job: unsuspend it."""
    assert kube.job is not None and kube.job["spec"]["suspend"] is True
    kube.job["spec"]["suspend"] = False


def test_kueue_job_waits_queued_and_its_deadline_clock_stands_still() -> None:
    kube = FakeKube()
    body = job(queueName="lq", activeDeadlineSeconds=5)
    # Created days ago and queued ever since: no deadline time used.
    body["status"] = {"startTime": "2020-01-01T00:00:00Z", "activeSeconds": 1.0, "state": "Queued"}
    status = passes(kube, body)
    assert kube.job is not None and kube.job["spec"]["suspend"] is True
    assert kube.job["spec"]["parallelism"] == 4  # fixed at creation: Kueue admits this many
    status = passes(kube, body)
    assert status["state"] == "Queued" and status["reason"] == "Queued"
    assert cond(status, "Queued")["status"] == "True" and "lq" in cond(status, "Queued")["message"]
    assert cond(status, "Failed")["status"] == "False" and status.get("runningSince") is None
    assert status["activeSeconds"] == 1.0
    admit(kube)
    status = passes(kube, body)
    assert status["state"] == "Running" and status["runningSince"]
    assert cond(status, "Queued")["status"] == "False"
    # It had run for a second before (activeSeconds): admitted again, so Resumed.
    assert ("Resumed", "Kueue admitted the workers") in kube.events


def test_kueue_job_parallelism_is_never_patched_after_admission() -> None:
    kube = FakeKube()
    body = job(queueName="lq")
    passes(kube, body)
    admit(kube)
    passes(kube, body)
    assert ("Admitted", "Kueue admitted the workers") in kube.events
    for i, s in enumerate(kube.shards.values()):  # the backlog shrinks: a plain job would scale down
        s["status"] = {"state": "Done", "attempt": 1} if i else {"state": "Pending"}
    passes(kube, body, n=3)
    assert kube.patches == [] and kube.job is not None and kube.job["spec"]["parallelism"] == 4
    # Preempted: Kueue suspends the Job; the operator does not fight it.
    kube.job["spec"]["suspend"] = True
    status = passes(kube, body)
    assert status["state"] == "Queued" and kube.patches == []
    assert any(r == "Preempted" for r, _ in kube.events)
    admit(kube)
    passes(kube, body)
    assert any(r == "Resumed" for r, _ in kube.events)


def test_kueue_job_suspended_or_failed_gives_its_quota_back_by_deletion() -> None:
    kube = FakeKube()
    passes(kube, job(queueName="lq"))
    admit(kube)
    passes(kube, job(queueName="lq"))
    status = passes(kube, job(queueName="lq", suspend=True))
    assert kube.deleted == ["j-workers"] and kube.patches == []
    assert status["state"] == "Suspended"


def test_a_missing_local_queue_is_named() -> None:
    kube = FakeKube()
    kube.local_queue = False
    passes(kube, job(queueName="nope"))
    status = passes(kube, job(queueName="nope"))
    assert status["reason"] == "LocalQueueNotFound"
    assert (
        "spec.queueName: LocalQueue 'nope' does not exist in namespace ns"
        in cond(status, "Queued")["message"]
    )
    assert any(r == "LocalQueueNotFound" for r, _ in kube.events)


def failed_pod(name: str, code: int, message: str, reason: str = "Error", **pod: Any) -> JSON:
    return {
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "spec": pod.get("spec") or {"containers": [{"name": "worker"}]},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "worker",
                    "state": {
                        "terminated": {
                            "exitCode": code,
                            "reason": reason,
                            "message": message,
                            "finishedAt": "2026-01-01T00:00:05Z",
                        }
                    },
                }
            ],
        },
    }


def test_a_planning_error_reaches_the_failed_condition() -> None:
    kube = FakeKube()
    body = job(prompts=None, promptsFrom={"uri": "/data/p.jsonl"})
    passes(kube, body)
    msg = "spec.promptsFrom.uri: /data/p.jsonl line 3: not JSON; fix that line"
    kube.pods = [failed_pod("w-1", 2, msg)]
    status = passes(kube, body)
    failed = cond(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "PlanningFailed" and failed["message"] == msg
    assert ("WorkerFailed", f"worker pod w-1 (worker) failed with exit code 2: {msg}") in kube.events


@pytest.mark.parametrize(
    ("pod", "reason", "in_message"),
    [
        (
            {
                "metadata": {"name": "w-1"},
                "status": {
                    "phase": "Pending",
                    "conditions": [
                        {
                            "type": "PodScheduled",
                            "status": "False",
                            "reason": "Unschedulable",
                            "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.",
                        }
                    ],
                },
            },
            "Unschedulable",
            "didn't match Pod's node affinity/selector. Check spec.workers.nodeSelector",
        ),
        (
            {
                "metadata": {"name": "w-1"},
                "status": {
                    "phase": "Pending",
                    "containerStatuses": [
                        {
                            "name": "worker",
                            "image": "reg/x:1",
                            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}},
                        }
                    ],
                },
            },
            "ImagePullBackOff",
            "cannot pull reg/x:1",
        ),
        (
            failed_pod(
                "w-1",
                137,
                "",
                reason="OOMKilled",
                spec={"containers": [{"name": "worker", "resources": {"limits": {"memory": "2Gi"}}}]},
            ),
            "OOMKilled",
            "OOMKilled at its memory limit 2Gi; raise spec.workers.resources.limits.memory",
        ),
        (failed_pod("w-1", 1, "RuntimeError: boom"), "WorkerCrashed", "exit code 1: RuntimeError: boom"),
    ],
    ids=["unschedulable", "image-pull", "oom", "crash"],
)
def test_worker_pod_problems_are_conditions_and_warnings(pod: JSON, reason: str, in_message: str) -> None:
    kube = FakeKube()
    passes(kube, job())
    kube.pods = [pod]
    status = passes(kube, job())
    healthy = cond(status, "WorkersHealthy")
    assert healthy["status"] == "False" and healthy["reason"] == reason and in_message in healthy["message"]
    assert status["reason"] == reason and status["state"] == "Running"
    assert in_message in cond(status, "Ready")["message"]
    assert any(r == reason and in_message in m for r, m in kube.events)
    # A pod that started after it is healthy again (the failure stays an Event).
    kube.pods = [
        pod,
        {
            "metadata": {"name": "w-2"},
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {"name": "worker", "state": {"running": {"startedAt": "2026-01-01T00:01:00Z"}}}
                ],
            },
        },
    ]
    if reason in ("OOMKilled", "WorkerCrashed"):
        assert cond(passes(kube, job()), "WorkersHealthy")["status"] == "True"


def test_a_crash_looping_worker_job_is_replaced_a_bounded_number_of_times() -> None:
    kube = FakeKube()
    body = job()
    passes(kube, body)
    made = 1
    for _ in range(10):
        assert kube.job is not None
        kube.pods = [failed_pod(f"w-{made}", 1, "RuntimeError: boom")]
        kube.job["status"] = {
            "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
        }
        status = passes(kube, body)
        if cond(status, "Failed")["status"] == "True":
            break
        passes(kube, body)  # makes the replacement
        made += 1
    assert made == 3  # the first Job and two replacements
    failed = cond(status, "Failed")
    assert failed["reason"] == "WorkersFailing" and "RuntimeError: boom" in failed["message"]


def test_a_prompt_file_is_planned_by_one_worker() -> None:
    kube = FakeKube()
    status = passes(kube, job(prompts=None, promptsFrom={"uri": "/data/p.txt"}))
    assert kube.shards == {}
    assert kube.job is not None and kube.job["spec"]["parallelism"] == 1
    assert cond(status, "Reconciling")["reason"] == "Planning"


def test_finished_worker_job_with_work_left_is_replaced() -> None:
    kube = FakeKube()
    body = job()
    passes(kube, body)
    assert kube.job is not None
    kube.job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    passes(kube, body)
    assert kube.deleted == ["j-workers"]
    passes(kube, body)
    assert kube.job is not None and kube.job["spec"]["parallelism"] == 4


def test_ttl_deletes_a_finished_job() -> None:
    kube = FakeKube()
    body = job(ttlSecondsAfterFinished=10)
    body["status"] = {
        "completionTime": "2020-01-01T00:00:00Z",
        "conditions": [
            {
                "type": "Complete",
                "status": "True",
                "reason": "Completed",
                "lastTransitionTime": "2020-01-01T00:00:00Z",
            }
        ],
    }
    Reconciler(kube).reconcile(body)  # type: ignore[arg-type]
    assert kube.deleted == ["j"]


def test_shard_plan_matches_the_builder() -> None:
    kube = FakeKube()
    passes(kube, job())
    want = shard_manifests(job(), 10, 2)
    assert sorted(kube.shards) == [m["metadata"]["name"] for m in want]


def test_started_workers_are_not_scaled_away_while_the_job_runs() -> None:
    kube = FakeKube()
    body = job()
    passes(kube, body)
    for i, s in enumerate(kube.shards.values()):
        s["status"] = (
            {"state": "Done", "attempt": 1} if i else {"state": "Claimed", "attempt": 1, "holder": "w0"}
        )
        if not i:
            s["status"]["leaseRenewTime"] = "2099-01-01T00:00:00Z"
    # Four started workers, one busy: the Job controller could delete the busy one, so keep four.
    kube.pods = [{"metadata": {"name": f"w{i}"}, "status": {"phase": "Running"}} for i in range(4)]
    passes(kube, body)
    assert kube.job is not None and kube.job["spec"]["parallelism"] == 4
    # Two not started yet: those may go (damped: two per step).
    kube.pods = [
        {"metadata": {"name": f"w{i}"}, "status": {"phase": "Running" if i < 1 else "Pending"}}
        for i in range(4)
    ]
    passes(kube, body)
    assert kube.job["spec"]["parallelism"] == 2


def test_a_role_of_the_same_name_not_owned_by_the_job_fails_it_and_runs_no_workers() -> None:
    kube = FakeKube()
    foreign = {"kind": "Role", "metadata": {"name": "j-worker", "ownerReferences": []}, "rules": ["x"]}
    kube.objects[("Role", "j-worker")] = copy.deepcopy(foreign)
    status = passes(kube, job())
    failed = cond(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "WorkerRBACNotOwned"
    assert "Role ns/j-worker exists and is not owned by ImageBatchJob j" in failed["message"]
    assert kube.job is None  # no workers
    assert kube.objects[("Role", "j-worker")] == foreign  # untouched
    assert status["desiredReplicas"] == 0


def test_pods_of_an_earlier_incarnation_are_not_counted() -> None:
    """A job deleted and created again under its name: the old job's pods, still ending, are not
    this one's workers (the progress line read `4/2 workers`)."""
    kube = FakeKube()
    body = job(workers={"maxReplicas": 2, "shardsPerReplica": 1})
    body["metadata"]["creationTimestamp"] = "2026-01-01T12:00:00Z"
    passes(kube, body)

    def pod(name: str, created: str) -> JSON:
        return {"metadata": {"name": name, "creationTimestamp": created}, "status": {"phase": "Running"}}

    old = [pod(f"old-{i}", "2026-01-01T11:59:00Z") for i in range(2)]
    kube.pods = [*old, pod("new-0", "2026-01-01T12:00:01Z"), pod("new-1", "2026-01-01T12:00:00Z")]
    status = passes(kube, body)
    assert status["activeReplicas"] == 2 and status["ready"] == "2/2", status
