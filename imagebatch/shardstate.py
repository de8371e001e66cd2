"""The shard state machine, shared by the operator and the worker: one place for every transition.

    Pending --claimed--> Claimed --done--> Done
                         Claimed --renewed--> Claimed (lease and progress)
                         Claimed --released--> Pending (SIGTERM, a crashed sibling process)
                         Claimed --stopped--> Pending (its pod was deleted or disrupted on purpose)
                         Claimed --errored / lost--> Pending, or Failed on the last attempt
                         Claimed --failed--> Failed (a user error: no retry can fix it)

`attempt` counts claims (it fences a zombie's writes); `failures` counts failed attempts and is
what `retries.maxAttempts` limits, so scale-in, suspend, drain and preemption (a release on
SIGTERM, or a pod we stopped that was SIGKILLed before it could release) never use up a shard's
retries. A Done shard may count items the engine could not make (`itemsFailed`): those cost the
items, not the shard.

Pure: each function takes a status and returns the next one; who writes it (the worker, fenced by
holder + attempt and resourceVersion, or the operator for a lost claim) is the caller's business.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from imagebatch.api import ImageBatchShardStatus
from imagebatch.reasons import EventReason
from imagebatch.timeutil import format_micro

JSON = dict[str, Any]


def shard_status(shard: JSON) -> ImageBatchShardStatus:
    """The shard's status; a shard just created has none yet and is Pending."""
    return ImageBatchShardStatus.model_validate(shard.get("status") or {})


def claimed(st: ImageBatchShardStatus, holder: str, now: datetime) -> ImageBatchShardStatus:
    return st.model_copy(
        update={
            "state": "Claimed",
            "attempt": st.attempt + 1,
            "holder": holder,
            "lease_renew_time": format_micro(now),
            "items_done": 0,
            "seconds": None,
            "items_failed": 0,
            "failed_items": None,
        }
    )


def holds(st: ImageBatchShardStatus, holder: str, attempt: int) -> bool:
    """The fence: `holder` may write only a claim of its own attempt (not a zombie's)."""
    return st.state == "Claimed" and st.holder == holder and st.attempt == attempt


def renewed(st: ImageBatchShardStatus, now: datetime, items_done: int) -> ImageBatchShardStatus:
    return st.model_copy(update={"lease_renew_time": format_micro(now), "items_done": items_done})


# A Done shard names at most this many of its failed items (the rest are in its errors part).
FAILED_ITEMS_SHOWN = 5


def done(
    st: ImageBatchShardStatus,
    now: datetime,
    items: int,
    seconds: float,
    failed_items: list[str] | None = None,
) -> ImageBatchShardStatus:
    """`items`: images stored; `failed_items`: ids of the items the engine could not make."""
    # leaseRenewTime of a Done shard is its completion time: the operator's throughput uses it.
    failed_items = failed_items or []
    return st.model_copy(
        update={
            "state": "Done",
            "lease_renew_time": format_micro(now),
            "items_done": items,
            "seconds": round(seconds, 3),
            "error": None,
            "items_failed": len(failed_items),
            "failed_items": failed_items[:FAILED_ITEMS_SHOWN] or None,
        }
    )


def released(st: ImageBatchShardStatus, error: str | None = None) -> ImageBatchShardStatus:
    """Back to Pending, attempt kept (the next claim raises it)."""
    return st.model_copy(
        update={
            "state": "Pending",
            "holder": None,
            "lease_renew_time": None,
            "items_done": 0,
            "error": error if error is not None else st.error,
        }
    )


def errored(st: ImageBatchShardStatus, error: str, max_attempts: int) -> ImageBatchShardStatus:
    """After a failed attempt: Pending for another try, or Failed when that was the last one."""
    counted = st.model_copy(update={"failures": st.failures + 1})
    if counted.failures >= max_attempts:
        return failed(counted, error)
    return released(counted, error)


def failed(st: ImageBatchShardStatus, error: str) -> ImageBatchShardStatus:
    return st.model_copy(
        update={"state": "Failed", "holder": None, "lease_renew_time": None, "items_done": 0, "error": error}
    )


# Why the operator takes a claim back from its holder (operator/leases.py decides which applies).
LEASE_EXPIRED = EventReason.LEASE_EXPIRED
HOLDER_GONE = EventReason.HOLDER_GONE
NO_PROGRESS = EventReason.PROGRESS_DEADLINE_EXCEEDED
# Not a failure: the holder's pod was deleted or disrupted on purpose (suspend, scale-in, drain,
# preemption) and ended before it could release the claim itself (SIGKILL after its grace period).
HOLDER_STOPPED = EventReason.HOLDER_STOPPED


def stopped(st: ImageBatchShardStatus, why: str) -> ImageBatchShardStatus:
    """A claim whose pod was stopped on purpose: back to Pending, no failure counted."""
    return released(st, f"worker pod {st.holder} was stopped ({why}) before it released the claim")


def lost(st: ImageBatchShardStatus, reason: str, max_attempts: int) -> ImageBatchShardStatus:
    """A claim whose holder stopped renewing or is gone: a failed attempt like any other error,
    with the holder's own last error kept in the message."""
    details: dict[str, str] = {
        LEASE_EXPIRED: f"worker {st.holder} stopped renewing its lease (attempt {st.attempt})",
        NO_PROGRESS: (
            f"worker {st.holder} made no progress at {st.items_done} images for "
            f"retries.progressDeadlineSeconds (attempt {st.attempt}); it may be hung"
        ),
    }
    detail = details.get(reason, f"worker pod {st.holder} is gone (attempt {st.attempt})")
    return errored(st, f"{detail}; last error: {st.error}" if st.error else detail, max_attempts)


def dump(st: ImageBatchShardStatus) -> JSON:
    return st.model_dump(by_alias=True, exclude_none=True)
