"""Shard claims seen from the operator: which leases expired, which holders are gone. Pure.

A claim goes back to Pending when its lease was not renewed for `leaseSeconds` or its holder pod
no longer runs; the attempt count is kept (the next claim raises it). A shard whose failed attempt
was its last (`attempt >= maxAttempts`) becomes Failed with the last error instead, so a shard that
kills its worker every time does not burn GPUs forever. The transition itself is the shared state
machine's (`shardstate.lost`), the same one a worker uses for its own errors.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from imagebatch import shardstate
from imagebatch.api import ImageBatchShardStatus
from imagebatch.holders import holder_pod
from imagebatch.timeutil import parse_time


@dataclass(frozen=True)
class Transition:
    shard: dict[str, Any]  # as listed: its resourceVersion fences the write
    status: ImageBatchShardStatus
    reason: str  # shardstate.LEASE_EXPIRED or shardstate.HOLDER_GONE


def lost_claim_reason(
    st: ImageBatchShardStatus, live_pods: Collection[str], now: datetime, lease_seconds: int
) -> str | None:
    if st.state != "Claimed":
        return None
    if st.holder is None or holder_pod(st.holder) not in live_pods:
        return shardstate.HOLDER_GONE
    renewed = parse_time(st.lease_renew_time)
    if renewed is None or (now - renewed).total_seconds() > lease_seconds:
        return shardstate.LEASE_EXPIRED
    return None


def review(
    shards: Iterable[dict[str, Any]],
    live_pods: Collection[str],
    now: datetime,
    lease_seconds: int,
    max_attempts: int,
) -> list[Transition]:
    """The status writes that return lost claims to Pending, or fail shards out of attempts.

    `live_pods` must be listed after `shards`: a pod that claimed a shard existed before its claim,
    so a claim is never taken for orphaned because of a stale pod list.
    """
    out: list[Transition] = []
    for shard in shards:
        st = shardstate.shard_status(shard)
        why = lost_claim_reason(st, live_pods, now, lease_seconds)
        if why is not None:
            out.append(Transition(shard, shardstate.lost(st, why, max_attempts), why))
    return out
