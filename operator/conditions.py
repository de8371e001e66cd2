"""The job's conditions, state and reason, from what a reconcile pass decided. Pure.

`Complete` and `Failed` are what `kubectl wait --for=condition=...` and humans read; `Queued` is
Kueue's waiting; `WorkersHealthy` says whether worker pods run (image pulls, scheduling, memory,
crashes); `Ready`, `Reconciling` and `Stalled` are kstatus' (Flux, Argo CD, `kubectl wait`); all
carry `observedGeneration`. A condition keeps its `lastTransitionTime` until its status changes.

The types, reasons and states are the API's (imagebatch/reasons.py); this module only says
which conditions an outcome sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from imagebatch.api import Condition
from imagebatch.reasons import ConditionType as Type
from imagebatch.reasons import Reason, State

COMPLETE, FAILED, SUSPENDED, QUEUED = Type.COMPLETE, Type.FAILED, Type.SUSPENDED, Type.QUEUED
WORKERS_HEALTHY, READY, RECONCILING, STALLED = (
    Type.WORKERS_HEALTHY,
    Type.READY,
    Type.RECONCILING,
    Type.STALLED,
)


@dataclass(frozen=True)
class WorkerProblem:
    reason: Reason
    message: str


@dataclass(frozen=True)
class Outcome:
    """What the job is doing, as a pass decided; at most one of complete/failed holds."""

    complete: bool = False
    failed_reason: str | None = None  # a Reason (a str: one an older operator wrote stays as it was)
    message: str = ""  # why it failed, or what it is doing
    suspended: bool = False
    queued: bool = False
    progress_reason: str = Reason.RUNNING
    problem: WorkerProblem | None = None  # worker pods that do not run, and why

    @property
    def finished(self) -> bool:
        return self.complete or self.failed_reason is not None

    @property
    def state(self) -> State:
        if self.complete:
            return State.COMPLETE
        if self.failed_reason is not None:
            return State.FAILED
        if self.suspended:
            return State.SUSPENDED
        if self.queued:
            return State.QUEUED
        return State.RUNNING

    @property
    def reason(self) -> str:
        if self.complete:
            return Reason.COMPLETED
        if self.failed_reason is not None:
            return self.failed_reason
        if self.suspended:
            return Reason.SUSPENDED
        if self.problem is not None and not self.queued:
            return self.problem.reason
        return self.progress_reason

    @property
    def text(self) -> str:
        """The message of the Ready condition: what a human needs first."""
        if self.problem is not None and not self.finished and not self.suspended and not self.queued:
            return self.problem.message
        return self.message


Row = tuple[Type, bool, str, str]


def desired_conditions(o: Outcome) -> list[Row]:
    """(type, status, reason, message) of every condition, before times are attached."""
    r, msg = o.reason, o.text
    healthy: Row = (
        (Type.WORKERS_HEALTHY, False, o.problem.reason, o.problem.message)
        if o.problem is not None
        else (Type.WORKERS_HEALTHY, True, Reason.WORKERS_RUNNING, "")
    )
    if o.complete:
        return [
            (Type.COMPLETE, True, r, o.message),
            (Type.FAILED, False, r, ""),
            (Type.SUSPENDED, False, r, ""),
            (Type.QUEUED, False, r, ""),
            healthy,
            (Type.READY, True, r, o.message),
            (Type.RECONCILING, False, r, ""),
            (Type.STALLED, False, r, ""),
        ]
    if o.failed_reason is not None:
        return [
            (Type.COMPLETE, False, r, ""),
            (Type.FAILED, True, r, o.message),
            (Type.SUSPENDED, False, r, ""),
            (Type.QUEUED, False, r, ""),
            healthy,
            (Type.READY, False, r, o.message),
            (Type.RECONCILING, False, r, ""),
            (Type.STALLED, True, r, o.message),
        ]
    if o.suspended:
        text = o.message or "spec.suspend is true: workers scaled to 0"
        return [
            (Type.COMPLETE, False, r, ""),
            (Type.FAILED, False, r, ""),
            (Type.SUSPENDED, True, r, text),
            (Type.QUEUED, False, r, ""),
            healthy,
            # Ready: as its spec asks (suspended). kstatus reads a Ready False job as InProgress,
            # so a Flux `wait: true` on a deliberately suspended job would never be ready.
            (Type.READY, True, r, "suspended"),
            (Type.RECONCILING, False, r, ""),
            (Type.STALLED, False, r, ""),
        ]
    # Queued is waiting, as Suspended is, not working: Reconciling False and Ready True, so kstatus
    # (Flux) reads it Current, as Flux reads a Job that Kueue holds suspended (docs/operator.md,
    # GitOps); the Ready message still says what it waits for.
    return [
        (Type.COMPLETE, False, r, ""),
        (Type.FAILED, False, r, ""),
        (Type.SUSPENDED, False, r, ""),
        (Type.QUEUED, o.queued, o.progress_reason if o.queued else r, o.message if o.queued else ""),
        healthy,
        (Type.READY, o.queued, r, msg),
        (Type.RECONCILING, not o.queued, r, "" if o.queued else msg),
        (Type.STALLED, False, r, ""),
    ]


def compute_conditions(
    previous: Sequence[Condition], outcome: Outcome, generation: int | None, now: str
) -> list[Condition]:
    """The new condition list; `lastTransitionTime` moves only when a status flips."""
    before = {c.type: c for c in previous}
    out: list[Condition] = []
    for type_, true, reason, message in desired_conditions(outcome):
        status: Literal["True", "False"] = "True" if true else "False"
        old = before.get(type_)
        since = old.last_transition_time if old is not None and old.status == status else now
        out.append(
            Condition(
                type=str(type_),
                status=status,
                reason=str(reason),
                message=message,
                last_transition_time=since,
                observed_generation=generation,
            )
        )
    return out


def is_true(conditions: Sequence[Condition], type_: str) -> bool:
    return any(c.type == type_ and c.status == "True" for c in conditions)


def find(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)
