"""The job's new status: the one builder of it, and the Events its condition changes post. Pure.

Every plan's status comes from `build` (reconcile.py writes it in one call, when it changed), so
what a finished job shows (no desired workers, no ETA, a completion time) is said once, here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from imagebatch.api import Condition, ImageBatchJobStatus
from imagebatch.operator import conditions
from imagebatch.operator.conditions import Outcome
from imagebatch.operator.plan import PostEvent
from imagebatch.reasons import ConditionType, EventReason, Reason
from imagebatch.timeutil import format_time


def build(
    prev: ImageBatchJobStatus,
    outcome: Outcome,
    generation: int | None,
    now: datetime,
    **fields: Any,
) -> ImageBatchJobStatus:
    """`prev` with `fields` (status field names) and the conditions of `outcome`."""
    status = prev.model_copy(update=fields)
    status.conditions = conditions.compute_conditions(prev.conditions, outcome, generation, format_time(now))
    status.state, status.reason = str(outcome.state), str(outcome.reason)
    status.observed_generation = generation
    if outcome.finished:
        status.completion_time = status.completion_time or format_time(now)
        status.desired_replicas = 0
        status.eta = ""
        status.running_since = None
    return status


def current_condition(status: ImageBatchJobStatus) -> ConditionType:
    """The one condition the job metrics count it under."""
    for c in (ConditionType.COMPLETE, ConditionType.FAILED, ConditionType.SUSPENDED):
        if conditions.is_true(status.conditions, c):
            return c
    return ConditionType.RECONCILING


def transition_events(before: Sequence[Condition], after: Sequence[Condition]) -> list[PostEvent]:
    """An Event for each condition change a human wants to hear of (kubectl events)."""
    out: list[PostEvent] = []
    for c in after:
        was = conditions.is_true(before, c.type)
        now_true = c.status == "True"
        if now_true and not was:
            if c.type == ConditionType.COMPLETE:
                out.append(PostEvent("Normal", EventReason.COMPLETED, c.message))
            elif c.type == ConditionType.FAILED:
                out.append(PostEvent("Warning", EventReason.FAILED, f"{c.reason}: {c.message}"))
            elif c.type == ConditionType.SUSPENDED:
                out.append(PostEvent("Normal", EventReason.SUSPENDED, "workers scaled to 0"))
            elif c.type == ConditionType.QUEUED and c.reason == Reason.LOCAL_QUEUE_NOT_FOUND:
                out.append(PostEvent("Warning", EventReason.LOCAL_QUEUE_NOT_FOUND, c.message))
        elif was and not now_true and c.type == ConditionType.SUSPENDED:
            out.append(PostEvent("Normal", EventReason.RESUMED, "spec.suspend is false again"))
        elif c.type == ConditionType.WORKERS_HEALTHY and not now_true:
            old = conditions.find(before, c.type)
            if old is None or old.status == "True" or old.reason != c.reason:
                out.append(PostEvent("Warning", EventReason(c.reason), c.message))
    return out
