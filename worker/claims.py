"""Shard claims seen from a worker: the status each step writes, and the fence. Pure.

Every write is fenced twice: by the resourceVersion it was read at (the API refuses a stale
write), and by holder + attempt (a worker acts only on a claim that is still its own), so a
zombie that lost its claim to an expired lease cannot mark the shard Done or Pending.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from imagebatch.api import ImageBatchShardStatus
from imagebatch.operator.leases import shard_status
from imagebatch.operator.timeutil import format_micro

JSON = dict[str, Any]


def claim_order(shards: Sequence[JSON], pod: str) -> list[JSON]:
    """Pending shards, starting at a place that depends on the pod, so workers rarely collide."""
    pending = sorted(
        (s for s in shards if shard_status(s).state == "Pending"), key=lambda s: int(s["spec"]["index"])
    )
    if not pending:
        return []
    k = zlib.crc32(pod.encode()) % len(pending)
    return pending[k:] + pending[:k]


def claimed_by_others(shards: Sequence[JSON], pod: str) -> bool:
    return any((st := shard_status(s)).state == "Claimed" and st.holder != pod for s in shards)


def claimed(st: ImageBatchShardStatus, pod: str, now: datetime) -> ImageBatchShardStatus:
    return st.model_copy(
        update={
            "state": "Claimed",
            "attempt": st.attempt + 1,
            "holder": pod,
            "lease_renew_time": format_micro(now),
            "items_done": 0,
            "seconds": None,
        }
    )


def holds(st: ImageBatchShardStatus, pod: str, attempt: int) -> bool:
    return st.state == "Claimed" and st.holder == pod and st.attempt == attempt


def renewed(st: ImageBatchShardStatus, now: datetime, items_done: int) -> ImageBatchShardStatus:
    return st.model_copy(update={"lease_renew_time": format_micro(now), "items_done": items_done})


def done(st: ImageBatchShardStatus, now: datetime, items: int, seconds: float) -> ImageBatchShardStatus:
    # leaseRenewTime of a Done shard is its completion time: the operator's throughput uses it.
    return st.model_copy(
        update={
            "state": "Done",
            "lease_renew_time": format_micro(now),
            "items_done": items,
            "seconds": round(seconds, 3),
            "error": None,
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
    if st.attempt >= max_attempts:
        return failed(st, error)
    return released(st, error)


def failed(st: ImageBatchShardStatus, error: str) -> ImageBatchShardStatus:
    return st.model_copy(
        update={"state": "Failed", "holder": None, "lease_renew_time": None, "items_done": 0, "error": error}
    )


def dump(st: ImageBatchShardStatus) -> JSON:
    return st.model_dump(by_alias=True, exclude_none=True)
