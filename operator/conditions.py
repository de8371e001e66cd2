"""The job's conditions, from what reconcile found. Pure.

`Complete` and `Failed` are what `kubectl wait --for=condition=...` and humans read; `Ready`,
`Reconciling` and `Stalled` are kstatus' (Flux, Argo CD, `kubectl wait`); all carry
`observedGeneration`. A condition keeps its `lastTransitionTime` until its status changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from imagebatch.api import Condition

COMPLETE = "Complete"
FAILED = "Failed"
SUSPENDED = "Suspended"
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
ORDER = (COMPLETE, FAILED, SUSPENDED, READY, RECONCILING, STALLED)


@dataclass(frozen=True)
class Outcome:
    """What the job is doing, as reconcile sees it; at most one of complete/failed holds."""

    complete: bool = False
    failed_reason: str | None = None  # ShardsFailed, ModelLoadError, DeadlineExceeded, InvalidSpec, ...
    message: str = ""  # why it failed, or what it is doing
    suspended: bool = False
    progress_reason: str = "Running"  # Planning, Running, Joining, ...

    @property
    def finished(self) -> bool:
        return self.complete or self.failed_reason is not None


def _cond(type_: str, true: bool, reason: str, message: str) -> tuple[str, bool, str, str]:
    return (type_, true, reason, message)


def desired_conditions(o: Outcome) -> list[tuple[str, bool, str, str]]:
    """(type, status, reason, message) of every condition, before times are attached."""
    if o.complete:
        return [
            _cond(COMPLETE, True, "Completed", o.message),
            _cond(FAILED, False, "Completed", ""),
            _cond(SUSPENDED, False, "Completed", ""),
            _cond(READY, True, "Completed", o.message),
            _cond(RECONCILING, False, "Completed", ""),
            _cond(STALLED, False, "Completed", ""),
        ]
    if o.failed_reason is not None:
        return [
            _cond(COMPLETE, False, o.failed_reason, ""),
            _cond(FAILED, True, o.failed_reason, o.message),
            _cond(SUSPENDED, False, o.failed_reason, ""),
            _cond(READY, False, o.failed_reason, o.message),
            _cond(RECONCILING, False, o.failed_reason, ""),
            _cond(STALLED, True, o.failed_reason, o.message),
        ]
    if o.suspended:
        return [
            _cond(COMPLETE, False, "Suspended", ""),
            _cond(FAILED, False, "Suspended", ""),
            _cond(SUSPENDED, True, "Suspended", o.message or "spec.suspend is true: workers scaled to 0"),
            _cond(READY, False, "Suspended", "suspended"),
            _cond(RECONCILING, False, "Suspended", ""),
            _cond(STALLED, False, "Suspended", ""),
        ]
    return [
        _cond(COMPLETE, False, o.progress_reason, ""),
        _cond(FAILED, False, o.progress_reason, ""),
        _cond(SUSPENDED, False, o.progress_reason, ""),
        _cond(READY, False, o.progress_reason, o.message),
        _cond(RECONCILING, True, o.progress_reason, o.message),
        _cond(STALLED, False, o.progress_reason, ""),
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
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=since,
                observed_generation=generation,
            )
        )
    return out


def is_true(conditions: Sequence[Condition], type_: str) -> bool:
    return any(c.type == type_ and c.status == "True" for c in conditions)
