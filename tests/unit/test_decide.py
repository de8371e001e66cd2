"""decide() as a table: small builders of observed worlds, each case naming the status it expects
(STATE, REASON, the WorkersHealthy reason) and the actions, in order. Every Reason has a case:
`test_every_reason_has_a_case` enumerates the enum, so a new reason needs a row here."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from imagebatch.api import ImageBatchJobSpec, ImageBatchJobStatus
from imagebatch.names import (
    ANNOTATION_ITEM_COUNT,
    ANNOTATION_MANIFEST_LINES,
    ANNOTATION_SHARD_COUNT,
    MODEL_LOAD_ERROR,
)
from imagebatch.operator import decide, plan, workers
from imagebatch.operator.observed import Observed, Prompts, Refusal, Workload
from imagebatch.reasons import ConditionType, Reason, State
from imagebatch.timeutil import format_time

JSON = dict[str, Any]
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
SHARDS = 5  # of 2 items each


# -- builders of an observed world ---------------------------------------------------------------------
def spec(**fields: Any) -> JSON:
    base: JSON = {
        "model": {"name": "builtin:tiny"},
        "prompts": [f"p{i}" for i in range(2 * SHARDS)],
        "batching": {"shardSize": 2},
        "output": {"uri": "/out"},
        "workers": {"maxReplicas": 4, "shardsPerReplica": 1},
    }
    return {**base, **fields}


def shard(i: int, state: str = "Pending", *, joined: bool = False, **status: Any) -> JSON:
    annotations = {ANNOTATION_SHARD_COUNT: str(SHARDS), ANNOTATION_ITEM_COUNT: str(2 * SHARDS)}
    if joined:
        annotations[ANNOTATION_MANIFEST_LINES] = str(2 * SHARDS)
    return {
        "metadata": {"name": f"j-s{i:05d}", "annotations": annotations},
        "spec": {"jobName": "j", "index": i, "start": 2 * i, "end": 2 * i + 2},
        "status": {"state": state, "attempt": 1 if state != "Pending" else 0, **status},
    }


def shards(state: str = "Pending", **status: Any) -> list[JSON]:
    return [shard(i, state, joined=(i == 0 and state == "Done"), **status) for i in range(SHARDS)]


def pod(name: str, phase: str = "Running", **status: Any) -> JSON:
    return {"metadata": {"name": name, "uid": f"uid-{name}"}, "status": {"phase": phase, **status}}


def failed_pod(name: str, code: int, message: str, reason: str = "Error") -> JSON:
    terminated = {
        "exitCode": code,
        "reason": reason,
        "message": message,
        "finishedAt": "2026-12-03T11:59:00Z",
    }
    return pod(name, "Failed", containerStatuses=[{"name": "worker", "state": {"terminated": terminated}}])


def worker_job(
    parallelism: int = 4, *, suspend: bool = False, condition: str | None = None, **annotations: str
) -> JSON:
    conditions = [{"type": condition, "status": "True"}] if condition else []
    return {
        "metadata": {"name": "j-workers", "annotations": annotations},
        "spec": {"parallelism": parallelism, "suspend": suspend},
        "status": {"conditions": conditions},
    }


def finished_status(type_: ConditionType, reason: str, **fields: Any) -> JSON:
    return {
        "state": "Complete" if type_ == ConditionType.COMPLETE else "Failed",
        "conditions": [
            {
                "type": type_,
                "status": "True",
                "reason": reason,
                "message": "said before",
                "lastTransitionTime": "2026-12-03T11:58:00Z",
            }
        ],
        "completionTime": format_time(NOW - timedelta(seconds=100)),
        **fields,
    }


def world(raw_spec: JSON | None = None, status: JSON | None = None, **fields: Any) -> Observed:
    raw = raw_spec if raw_spec is not None else spec()
    try:
        model: ImageBatchJobSpec | None = ImageBatchJobSpec.model_validate(raw)
        invalid = None
    except ValueError:
        model, invalid = None, "spec.batching.shardSize: must be at least 1"
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1}, "spec": raw}
    prev = ImageBatchJobStatus.model_validate(status or {})
    obs = Observed(
        job=job,
        prev=prev,
        spec=model,
        invalid_spec=invalid,
        queue_name=raw.get("queueName"),
        ttl_seconds_after_finished=raw.get("ttlSecondsAfterFinished"),
        now=NOW,
        mono=1000.0,
        finished=any(
            c.status == "True" and c.type in (ConditionType.COMPLETE, ConditionType.FAILED)
            for c in prev.conditions
        ),
    )
    for k, v in fields.items():
        setattr(obs, k, v)
    return obs


def summary(p: plan.Plan) -> list[str]:
    """The actions as short words: their type and what tells them apart."""
    out = []
    for a in p.actions:
        match a:
            case plan.PostEvent():
                out.append(f"Event {a.reason}")
            case plan.CreateWorkers():
                out.append(f"CreateWorkers {a.parallelism}")
            case plan.PatchWorkers():
                out.append(f"PatchWorkers {a.patch}")
            case plan.CreateShards():
                out.append(f"CreateShards {len(a.manifests)}")
            case plan.WriteShardStatus():
                out.append(f"WriteShardStatus {a.reason}")
            case _:
                out.append(type(a).__name__)
    return out


@dataclass(frozen=True)
class Case:
    name: str
    obs: Observed
    state: State
    reason: Reason  # status.reason (the REASON column)
    actions: list[str]
    healthy: Reason = Reason.WORKERS_RUNNING  # the WorkersHealthy condition's reason
    desired: int | None = None
    mem: decide.Memory = field(default_factory=decide.Memory)


RUNNING_4 = [pod(f"w-{i}") for i in range(4)]
QUEUED = spec(queueName="team-a")
PROMPT_FILE = spec(prompts=None, promptsFrom={"uri": "/data/p.jsonl"})
PLAIN_FAILED = failed_pod("w-1", 1, "RuntimeError: boom")
QUEUED_4 = spec(queueName="team-a", workers={"maxReplicas": 4, "shardsPerReplica": 1})
QUEUED_2 = spec(queueName="team-a", workers={"maxReplicas": 2, "shardsPerReplica": 1})
# A worker Job made for QUEUED_4 and never admitted (suspended, its shape stamped by builders.py).
MADE_FOR_4 = {workers.ANNOTATION_SHAPE: workers.shape(ImageBatchJobSpec.model_validate(QUEUED_4), 4)}
NEVER_FITS = Workload(
    admitted=False,
    quota=("cpu in flavor default: 4 workers ask 1, more than the ClusterQueue's maximum capacity (500m)",),
    exceeds_capacity=True,
    pods=4,
)


def one_succeeded(wj: JSON) -> JSON:
    """The worker Job after one of its pods left with exit 0: it makes no new pods."""
    wj["status"]["succeeded"] = 1
    return wj


CASES = [
    # -- working
    Case(
        "inline prompts are planned into shards",
        world(prompts=Prompts(items=10)),
        State.RUNNING,
        Reason.PLANNING,
        ["CreateShards 5", "Event CreatedShards"],
    ),
    Case(
        "a prompt file is planned by one worker",
        world(PROMPT_FILE),
        State.RUNNING,
        Reason.PLANNING,
        ["CreateWorkers 1", "Event ScaledUp"],
        desired=1,
    ),
    Case(
        "planned shards get their workers",
        world(shards=shards()),
        State.RUNNING,
        Reason.RUNNING,
        ["CreateWorkers 4", "Event ScaledUp"],
        desired=4,
    ),
    Case(
        "a claim of a gone pod goes back to Pending",
        world(
            shards=[shard(0, "Claimed", holder="w-9/1"), *shards()[1:]],
            pods=RUNNING_4,
            worker_job=worker_job(),
        ),
        State.RUNNING,
        Reason.RUNNING,
        ["WriteShardStatus HolderGone", "Event HolderGone"],
        desired=4,
    ),
    Case(
        "the backlog shrinks: scale down by at most two",
        world(
            shards=[*shards("Done")[:4], shard(4)], pods=[pod("w-0", "Pending")] * 4, worker_job=worker_job()
        ),
        State.RUNNING,
        Reason.RUNNING,
        ["PatchWorkers {'parallelism': 2}", "Event ScaledDown"],
        desired=2,
    ),
    Case(
        "every shard done: one worker joins",
        world(shards=[shard(i, "Done") for i in range(SHARDS)]),
        State.RUNNING,
        Reason.JOINING,
        ["CreateWorkers 1", "Event ScaledUp"],
        desired=1,
    ),
    Case(
        "the prompt ConfigMap is not there yet",
        world(
            spec(prompts=None, promptsFrom={"configMapKeyRef": {"name": "cm", "key": "k"}}),
            prompts=Prompts(waiting="waiting for ConfigMap cm"),
        ),
        State.RUNNING,
        Reason.WAITING_FOR_PROMPTS,
        [],
        desired=0,
    ),
    Case(
        "the worker Job of an earlier incarnation is still there",
        world(shards=shards(), not_ours=Refusal("earlier", "Job", "waiting for the garbage collector")),
        State.RUNNING,
        Reason.WAITING_FOR_EARLIER_INCARNATION,
        [],
        desired=0,
    ),
    Case(
        "a Kueue job waits for admission",
        world(QUEUED, shards=shards(), local_queue_found=True),
        State.QUEUED,
        Reason.QUEUED,
        ["CreateWorkers 4", "Event ScaledUp"],
    ),
    Case(
        "admitted after waiting",
        world(QUEUED, {"state": "Queued"}, shards=shards(), worker_job=worker_job(), local_queue_found=True),
        State.RUNNING,
        Reason.RUNNING,
        ["Event Admitted"],
        desired=4,
    ),
    Case(
        "a missing LocalQueue is named",
        world(QUEUED, shards=shards(), local_queue_found=False),
        State.QUEUED,
        Reason.LOCAL_QUEUE_NOT_FOUND,
        ["CreateWorkers 4", "Event ScaledUp", "Event LocalQueueNotFound"],
    ),
    Case(
        "Kueue's words for the missing quota",
        world(
            QUEUED,
            {"state": "Queued"},
            shards=shards(),
            worker_job=worker_job(suspend=True),
            local_queue_found=True,
            workload=Workload(
                False, ("insufficient unused quota for cpu in flavor default, 250m more needed",)
            ),
        ),
        State.QUEUED,
        Reason.QUEUED,
        [],
        desired=4,
    ),
    Case(
        "workers that can never fit the ClusterQueue say so",
        world(
            QUEUED_4,
            {"state": "Queued"},
            shards=shards(),
            worker_job=worker_job(suspend=True, **MADE_FOR_4),
            local_queue_found=True,
            workload=NEVER_FITS,
        ),
        State.QUEUED,
        Reason.NEVER_ADMITTABLE,
        [],
    ),
    Case(
        "maxReplicas lowered before admission: the worker Job is made again",
        world(
            QUEUED_2,
            {"state": "Queued"},
            shards=shards(),
            worker_job=worker_job(suspend=True, **MADE_FOR_4),
            local_queue_found=True,
            workload=NEVER_FITS,
        ),
        State.QUEUED,
        Reason.NEVER_ADMITTABLE,
        ["DeleteWorkers"],
        desired=0,
    ),
    Case(
        "maxReplicas lowered while preempted: no new Job (it was admitted once)",
        world(
            QUEUED_2,
            {"state": "Queued", "activeSeconds": 30.0},
            shards=shards(),
            worker_job=worker_job(suspend=True, **MADE_FOR_4),
            local_queue_found=True,
        ),
        State.QUEUED,
        Reason.QUEUED,
        [],
        desired=4,
    ),
    Case(
        "the last worker Job's Workload is still there: the new Job waits for it to go",
        world(QUEUED, {"state": "Queued"}, shards=shards(), local_queue_found=True, earlier_workload=True),
        State.QUEUED,
        Reason.QUEUED,
        [],
    ),
    Case(
        "spec.queueName where Kueue is not installed",
        world(QUEUED, shards=shards(), kueue_installed=False),
        State.QUEUED,
        Reason.KUEUE_NOT_INSTALLED,
        ["CreateWorkers 4", "Event ScaledUp"],
    ),
    Case(
        "a claim came back after the other workers left: a new worker Job takes it",
        world(
            shards=[*shards("Done")[:4], shard(4)],
            pods=[pod("w-0")],
            worker_job=one_succeeded(worker_job(1)),
        ),
        State.RUNNING,
        Reason.RUNNING,
        ["DeleteWorkers"],
    ),
    Case(
        "a claim came back while a worker is busy: it takes it after its shard",
        world(
            shards=[*shards("Done")[:3], shard(3, "Claimed", holder="w-0"), shard(4)],
            pods=[pod("w-0")],
            worker_job=one_succeeded(worker_job(1)),
        ),
        State.RUNNING,
        Reason.RUNNING,
        [],
    ),
    Case(
        "suspended: the workers go to zero",
        world(spec(suspend=True), shards=shards(), worker_job=worker_job()),
        State.SUSPENDED,
        Reason.SUSPENDED,
        ["PatchWorkers {'parallelism': 0, 'suspend': True}", "Event ScaledDown", "Event Suspended"],
        desired=0,
    ),
    Case(
        "every shard done and joined",
        world(shards=shards("Done"), worker_job=worker_job(0)),
        State.COMPLETE,
        Reason.COMPLETED,
        ["Event Completed"],
        desired=0,
    ),
    # -- failed
    Case(
        "a spec that does not validate",
        world(spec(batching={"shardSize": 0})),
        State.FAILED,
        Reason.INVALID_SPEC,
        ["Event Failed"],
    ),
    Case(
        "prompts no retry can fix",
        world(prompts=Prompts(error="spec.prompts[3]: 5000 characters")),
        State.FAILED,
        Reason.INVALID_PROMPTS,
        ["Event Failed"],
    ),
    Case(
        "the planning worker cannot read the prompt file",
        world(PROMPT_FILE, pods=[failed_pod("w-1", 2, "line 3: not JSON")], worker_job=worker_job(1)),
        State.FAILED,
        Reason.PLANNING_FAILED,
        ["Event WorkerFailed", "PatchWorkers {'parallelism': 0}", "Event ScaledDown", "Event Failed"],
        desired=0,
    ),
    Case(
        "a shard out of attempts",
        world(shards=[shard(0, "Failed", error="boom"), *shards()[1:]]),
        State.FAILED,
        Reason.SHARDS_FAILED,
        ["Event Failed"],
        desired=0,
    ),
    Case(
        "the model does not load",
        world(shards=[shard(0, "Failed", error=f"w-1: {MODEL_LOAD_ERROR}: no such model"), *shards()[1:]]),
        State.FAILED,
        Reason.MODEL_LOAD_ERROR,
        ["Event Failed"],
        desired=0,
    ),
    Case(
        "more items failed than retries.maxFailedItems allows",
        world(
            shards=[
                shard(0, "Done", joined=True, itemsFailed=2, failedItems=["0000", "0001"]),
                *shards("Done")[1:],
            ]
        ),
        State.FAILED,
        Reason.ITEMS_FAILED,
        ["Event Failed"],
        desired=0,
    ),
    Case(
        "past activeDeadlineSeconds of running",
        world(
            spec(activeDeadlineSeconds=60),
            {"runningSince": format_time(NOW - timedelta(seconds=61))},
            shards=shards(),
        ),
        State.FAILED,
        Reason.DEADLINE_EXCEEDED,
        ["Event Failed"],
        desired=0,
    ),
    Case(
        "the worker Job keeps failing without an image made",
        world(
            {**spec(), "workers": {"maxReplicas": 4}},
            {"workerJobRestarts": workers.MAX_WORKER_JOB_RESTARTS},
            shards=shards(),
            pods=[PLAIN_FAILED],
            worker_job=worker_job(condition="Failed"),
        ),
        State.FAILED,
        Reason.WORKERS_FAILING,
        ["Event WorkerFailed", "Event Failed"],
        desired=0,
    ),
    Case(
        "a shard name is taken by someone else's shard",
        world(refused=Refusal("foreign", "ImageBatchShard", "ImageBatchShard ns/j-s00000 exists")),
        State.FAILED,
        Reason.SHARD_NOT_OWNED,
        ["Event Failed"],
    ),
    Case(
        "the worker Job's name is taken",
        world(shards=shards(), not_ours=Refusal("foreign", "Job", "Job ns/j-workers exists")),
        State.FAILED,
        Reason.WORKER_JOB_NOT_OWNED,
        ["Event Failed"],
        desired=0,
    ),
    Case(
        "a Role of the job's name is someone else's",
        world(shards=shards(), refused=Refusal("foreign", "Role", "Role ns/j-worker exists")),
        State.FAILED,
        Reason.WORKER_RBAC_NOT_OWNED,
        ["Event Failed"],
        desired=0,
    ),
    Case(
        "its passes keep raising",
        world(shards=shards(), cannot_reconcile="RecursionError"),
        State.FAILED,
        Reason.CANNOT_RECONCILE,
        ["Event Failed"],
    ),
    # -- worker pods that do not run
    Case(
        "the image cannot be pulled",
        world(
            shards=shards(),
            worker_job=worker_job(),
            pods=[
                pod(
                    "w-1",
                    "Pending",
                    containerStatuses=[
                        {
                            "name": "worker",
                            "image": "reg/x:1",
                            "state": {"waiting": {"reason": "ImagePullBackOff"}},
                        }
                    ],
                )
            ],
        ),
        State.RUNNING,
        Reason.IMAGE_PULL_BACK_OFF,
        ["Event ImagePullBackOff"],
        healthy=Reason.IMAGE_PULL_BACK_OFF,
        desired=4,
    ),
    Case(
        "no node fits the pods",
        world(
            shards=shards(),
            worker_job=worker_job(),
            pods=[
                pod(
                    "w-1",
                    "Pending",
                    conditions=[
                        {
                            "type": "PodScheduled",
                            "status": "False",
                            "reason": "Unschedulable",
                            "message": "0/1 nodes",
                        }
                    ],
                )
            ],
        ),
        State.RUNNING,
        Reason.UNSCHEDULABLE,
        ["Event Unschedulable"],
        healthy=Reason.UNSCHEDULABLE,
        desired=4,
    ),
    Case(
        "a worker ran out of memory",
        world(
            shards=shards(), worker_job=worker_job(), pods=[failed_pod("w-1", 137, "", reason="OOMKilled")]
        ),
        State.RUNNING,
        Reason.OOM_KILLED,
        ["Event WorkerFailed", "Event OOMKilled"],
        healthy=Reason.OOM_KILLED,
        desired=4,
    ),
    Case(
        "a worker crashed",
        world(shards=shards(), worker_job=worker_job(), pods=[PLAIN_FAILED]),
        State.RUNNING,
        Reason.WORKER_CRASHED,
        ["Event WorkerFailed", "Event WorkerCrashed"],
        healthy=Reason.WORKER_CRASHED,
        desired=4,
    ),
    # -- finished
    Case(
        "a finished job's workers go; its Replicas column follows them",
        world(
            status=finished_status(ConditionType.COMPLETE, Reason.COMPLETED, activeReplicas=2),
            worker_job=worker_job(2),
            pods=[pod("w-1")],
        ),
        State.COMPLETE,
        Reason.COMPLETED,
        ["PatchWorkers {'parallelism': 0}"],
    ),
    Case(
        "a finished Kueue job's worker Job is deleted (its quota goes with it)",
        world(QUEUED, finished_status(ConditionType.FAILED, Reason.SHARDS_FAILED), worker_job=worker_job()),
        State.FAILED,
        Reason.SHARDS_FAILED,
        ["DeleteWorkers"],
    ),
    Case(
        "ttlSecondsAfterFinished has passed",
        world(spec(ttlSecondsAfterFinished=60), finished_status(ConditionType.COMPLETE, Reason.COMPLETED)),
        State.COMPLETE,
        Reason.COMPLETED,
        ["DeleteJob"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(case: Case) -> None:
    p = decide.decide(case.obs, case.mem)
    st = p.status
    assert (st.state, st.reason) == (case.state, case.reason)
    healthy = next(c for c in st.conditions if c.type == ConditionType.WORKERS_HEALTHY)
    assert healthy.reason == case.healthy
    assert summary(p) == case.actions
    if case.desired is not None:
        assert st.desired_replicas == case.desired
    # The status is whole: every condition type once, each with this generation.
    assert sorted(c.type for c in st.conditions) == sorted(ConditionType)
    assert {c.observed_generation for c in st.conditions} == {1}
    if State(st.state).finished:
        assert st.completion_time and st.desired_replicas == 0 and st.eta == ""


def test_every_reason_has_a_case() -> None:
    covered = {c.reason for c in CASES} | {c.healthy for c in CASES}
    assert set(Reason) - covered == set(), "a Reason without a case in CASES"


def test_decide_is_pure() -> None:
    """The same observation decides the same plan twice: nothing in it is changed by deciding."""
    obs = world(
        shards=[shard(0, "Claimed", holder="w-9/1"), *shards()[1:]], pods=RUNNING_4, worker_job=worker_job()
    )
    mem = decide.Memory()
    first, second = decide.decide(obs, mem), decide.decide(obs, mem)
    assert summary(first) == summary(second) and first.status == second.status
    fresh = decide.Memory()
    assert (mem.reported, mem.last_scale_down, mem.refused, mem.clock.seen) == (
        fresh.reported,
        fresh.last_scale_down,
        fresh.refused,
        fresh.clock.seen,
    )


def test_events_already_reported_are_not_posted_again() -> None:
    obs = world(shards=shards(), worker_job=worker_job(), pods=[PLAIN_FAILED])
    first = decide.decide(obs, decide.Memory())
    assert "Event WorkerFailed" in summary(first)
    again = decide.decide(obs, decide.Memory(reported=first.reported))
    assert "Event WorkerFailed" not in summary(again)
