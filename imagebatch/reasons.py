"""The words of an ImageBatchJob's status: condition types, reasons, states and Event reasons.

Part of the API (re-exported by imagebatch.api), as Kueue keeps its condition types and reasons
beside its API types: the operator writes them, and the client, the CLI and the metrics read them,
so none of them spells one as a literal. docs/operator.md lists every one (tests/unit/
test_conditions.py checks it), and tests/unit/test_decide.py has a case for every Reason.
"""

from __future__ import annotations

from enum import StrEnum


class ConditionType(StrEnum):
    """`Complete` and `Failed` are what `kubectl wait --for=condition=...` and humans read;
    `Queued` is Kueue's waiting; `WorkersHealthy` says whether worker pods run; `Ready`,
    `Reconciling` and `Stalled` are kstatus' (Flux, Argo CD, `kubectl wait`)."""

    COMPLETE = "Complete"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    QUEUED = "Queued"
    WORKERS_HEALTHY = "WorkersHealthy"
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"


class Reason(StrEnum):
    """The reason of the job's conditions and its REASON column."""

    # working
    PLANNING = "Planning"
    RUNNING = "Running"
    JOINING = "Joining"
    WAITING_FOR_PROMPTS = "WaitingForPrompts"
    WAITING_FOR_EARLIER_INCARNATION = "WaitingForEarlierIncarnation"
    QUEUED = "Queued"  # the worker Job waits for Kueue to admit it
    LOCAL_QUEUE_NOT_FOUND = "LocalQueueNotFound"
    KUEUE_NOT_INSTALLED = "KueueNotInstalled"  # spec.queueName on a cluster that serves no LocalQueues
    NEVER_ADMITTABLE = "NeverAdmittable"  # the workers ask more than the ClusterQueue can ever hold
    SUSPENDED = "Suspended"
    COMPLETED = "Completed"
    # failed
    INVALID_SPEC = "InvalidSpec"
    INVALID_PROMPTS = "InvalidPrompts"
    PLANNING_FAILED = "PlanningFailed"
    SHARDS_FAILED = "ShardsFailed"
    ITEMS_FAILED = "ItemsFailed"
    MODEL_LOAD_ERROR = "ModelLoadError"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    WORKERS_FAILING = "WorkersFailing"
    SHARD_NOT_OWNED = "ShardNotOwned"
    WORKER_JOB_NOT_OWNED = "WorkerJobNotOwned"
    WORKER_RBAC_NOT_OWNED = "WorkerRBACNotOwned"
    CANNOT_RECONCILE = "CannotReconcile"  # passes kept raising: the operator cannot process this job
    # worker pods (WorkersHealthy)
    WORKERS_RUNNING = "WorkersRunning"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    UNSCHEDULABLE = "Unschedulable"
    OOM_KILLED = "OOMKilled"
    WORKER_CRASHED = "WorkerCrashed"


class State(StrEnum):
    """The STATE column: one word for what the job is doing."""

    PENDING = "Pending"  # the client's word for a job the operator has not counted yet
    RUNNING = "Running"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    COMPLETE = "Complete"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (State.COMPLETE, State.FAILED)


class EventReason(StrEnum):
    """The reason of every Event the operator posts on a job (`kubectl events --for ibj/NAME`)."""

    CREATED_SHARDS = "CreatedShards"
    SCALED_UP = "ScaledUp"
    SCALED_DOWN = "ScaledDown"
    ADMITTED = "Admitted"  # Kueue admitted the workers for the first time
    RESUMED = "Resumed"  # admitted again after a preemption, or spec.suspend false again
    PREEMPTED = "Preempted"
    SUSPENDED = "Suspended"
    COMPLETED = "Completed"
    FAILED = "Failed"
    WORKER_FAILED = "WorkerFailed"
    FORGED_SHARD_IGNORED = "ForgedShardIgnored"
    LOCAL_QUEUE_NOT_FOUND = "LocalQueueNotFound"
    # a claim taken back from its holder (operator/leases.py decides which applies)
    LEASE_EXPIRED = "LeaseExpired"
    HOLDER_GONE = "HolderGone"
    PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
    # not a failure: the holder's pod was stopped on purpose (suspend, scale-in, drain, preemption)
    HOLDER_STOPPED = "HolderStopped"
    # worker pods that do not run (the WorkersHealthy condition going False)
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    UNSCHEDULABLE = "Unschedulable"
    OOM_KILLED = "OOMKilled"
    WORKER_CRASHED = "WorkerCrashed"
