"""One reconcile pass against a fake API: what it creates, scales and reports."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from imagebatch.names import ANNOTATION_MANIFEST_LINES, LABEL_JOB, LABEL_JOB_UID
from imagebatch.operator.kube import NotOwnedError, check_owned
from imagebatch.operator.reconcile import Reconciler
from imagebatch.shardplan import of_incarnation, shard_manifests

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

    def list_shards(self, ns: str, job: str, uid: str) -> list[JSON]:
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
        self.job["spec"].update(patch["spec"])

    def delete_worker_job(self, ns: str, name: str) -> None:
        self.deleted.append(name)
        self.job = None

    def list_worker_pods(self, ns: str, job: str) -> list[JSON]:
        return self.pods

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
    body["status"] = {"startTime": "2020-01-01T00:00:00Z"}
    status = passes(kube, body)
    assert cond(status, "Failed")["reason"] == "DeadlineExceeded"


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
