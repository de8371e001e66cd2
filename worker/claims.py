"""Which shard a worker claims next. Pure.

The transitions a claim goes through (claimed, renewed, done, released, errored, failed) are the
shared state machine, imagebatch/shardstate.py. Every write is fenced twice: by the
resourceVersion it was read at (the API refuses a stale write), and by holder + attempt
(`shardstate.holds`: a worker acts only on a claim that is still its own), so a zombie that lost
its claim to an expired lease cannot mark the shard Done or Pending.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from imagebatch.shardstate import shard_status

JSON = dict[str, Any]


def claim_order(shards: Sequence[JSON], pod: str) -> list[JSON]:
    """Pending shards, starting at a place that depends on the pod, so workers rarely collide."""
    pending = sorted(
        (s for s in shards if shard_status(s).state == "Pending"), key=lambda s: int(s["spec"]["index"])
    )
    return rotated(pending, pod)


def rotated(pending: Sequence[JSON], pod: str) -> list[JSON]:
    """Pending shards in index order, rotated to start at the pod's own place."""
    if not pending:
        return []
    k = zlib.crc32(pod.encode()) % len(pending)
    return [*pending[k:], *pending[:k]]


def claimed_by_others(shards: Sequence[JSON], pod: str) -> bool:
    return any((st := shard_status(s)).state == "Claimed" and st.holder != pod for s in shards)
