"""Shard claims seen from the operator: which holders are gone, hung or silent. Pure.

A claim goes back to Pending (a failed attempt: `shardstate.lost`) when
- its holder pod no longer runs (HolderGone) and was not stopped on purpose;
- its lease was not renewed for `retries.leaseSeconds` (LeaseExpired);
- its `itemsDone` did not move for `retries.progressDeadlineSeconds` although the lease is renewed
  (ProgressDeadlineExceeded): a renewing lease proves the process lives, not that it works.

Both clocks are the operator's own (monotonic) time since it last *saw* the claim change, never the
worker's `leaseRenewTime` against the operator's wall clock: two machines' clocks may disagree.
`ClaimClock` is that memory. It forgets nothing it needs across a restart of the operator: a fresh
operator sees every claim change "now" and so grants it a whole new lease, which is only later,
never wrong. Time in which the operator could not observe at all (the API server was away, the
operator was stopped) is not held against a worker either: after such a gap every claim is seen
afresh.

A holder pod that ended after we (or Kubernetes on our behalf) stopped it is not a failure: a pod
seen with a `deletionTimestamp` (the Job controller deleting it on suspend or scale-in, Kueue's
preemption, `kubectl delete`) or a `DisruptionTarget` condition (scheduler preemption, eviction,
a kubelet's node-pressure eviction or graceful shutdown) that goes without releasing its claim,
SIGKILLed at the end of its grace period, returns the claim as `HolderStopped`, with no failure
counted; so does the holder of a job or worker Job that is suspended. A crash, an OOM kill and a
node loss (the DisruptionTarget reasons of the pod garbage collector and the taint manager: the
node is gone or unreachable, the worker may have died with it) remain failures. `ClaimClock`
remembers the pods it saw stopping, since a pod is often gone from the API by the next pass.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagebatch import shardstate
from imagebatch.api import ImageBatchShardStatus
from imagebatch.holders import holder_pod


@dataclass(frozen=True)
class Transition:
    shard: dict[str, Any]  # as listed: its resourceVersion fences the write
    status: ImageBatchShardStatus
    reason: str  # shardstate.LEASE_EXPIRED, HOLDER_GONE, NO_PROGRESS or HOLDER_STOPPED


# DisruptionTarget reasons that mean the node went away (its pods may have died with it): failures.
NODE_LOSS_REASONS = frozenset({"DeletionByPodGC", "DeletionByTaintManager"})
NODE_LOST = "node lost"  # the value of ClaimClock.stopped for such a pod


def stop_cause(pod: Mapping[str, Any]) -> str | None:
    """Why a pod is being stopped on purpose (words for the shard's message), NODE_LOST when its
    node went away, or None: it was not stopped (it runs, crashed or was OOM-killed)."""
    st = pod.get("status") or {}
    for c in st.get("conditions") or []:
        if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
            reason = str(c.get("reason") or "")
            if reason in NODE_LOSS_REASONS:
                return NODE_LOST
            return f"disrupted: {reason or 'DisruptionTarget'}"
    for cs in st.get("containerStatuses") or []:
        if ((cs.get("state") or {}).get("terminated") or {}).get("reason") == "OOMKilled":
            return None  # out of memory while being deleted is still out of memory
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return "deleted: suspend, scale-in or preemption"
    return None


@dataclass
class _Seen:
    renewal: tuple[str | None, int, str | None]  # holder, attempt, leaseRenewTime
    renewed_at: float
    progress: tuple[str | None, int, int]  # holder, attempt, itemsDone
    progressed_at: float


@dataclass
class ClaimClock:
    """When the operator last saw each claim renewed and each claim progress (monotonic seconds)."""

    seen: dict[str, _Seen] = field(default_factory=dict)
    last_observed: float | None = None
    # Pods seen being stopped (name -> stop_cause): such a pod is often gone by the next pass.
    stopped: dict[str, str] = field(default_factory=dict)

    def observe_pods(self, pods: Iterable[Mapping[str, Any]]) -> None:
        """Records the worker pods seen stopping; forgets those no claim can still name."""
        for pod in pods:
            name = str(pod["metadata"]["name"])
            cause = stop_cause(pod)
            if cause is not None and self.stopped.get(name) != NODE_LOST:
                self.stopped[name] = cause
        holders = {name for s in self.seen.values() if (name := holder_pod(s.renewal[0] or ""))}
        listed = {str(p["metadata"]["name"]) for p in pods}
        self.stopped = {k: v for k, v in self.stopped.items() if k in holders or k in listed}

    def observe(self, shards: Iterable[dict[str, Any]], now: float, gap: float) -> None:
        """Records one pass's view of the shards. After `gap` seconds without a pass (an outage,
        a stopped operator) everything counts as seen now."""
        blind = self.last_observed is None or now - self.last_observed > gap
        self.last_observed = now
        keep: dict[str, _Seen] = {}
        for shard in shards:
            st = shardstate.shard_status(shard)
            if st.state != "Claimed":
                continue
            name = shard["metadata"]["name"]
            renewal = (st.holder, st.attempt, st.lease_renew_time)
            progress = (st.holder, st.attempt, st.items_done)
            old = None if blind else self.seen.get(name)
            if old is None:
                keep[name] = _Seen(renewal, now, progress, now)
                continue
            if old.renewal != renewal:
                old.renewal, old.renewed_at = renewal, now
            if old.progress != progress:
                old.progress, old.progressed_at = progress, now
            keep[name] = old
        self.seen = keep

    def silent_for(self, name: str, now: float) -> float:
        s = self.seen.get(name)
        return 0.0 if s is None else now - s.renewed_at

    def stuck_for(self, name: str, now: float) -> float:
        s = self.seen.get(name)
        return 0.0 if s is None else now - s.progressed_at


def lost_claim_reason(
    name: str,
    st: ImageBatchShardStatus,
    live_pods: Collection[str],
    clock: ClaimClock,
    now: float,
    lease_seconds: int,
    progress_deadline_seconds: int,
) -> str | None:
    if st.state != "Claimed":
        return None
    if st.holder is None or holder_pod(st.holder) not in live_pods:
        return shardstate.HOLDER_GONE
    if clock.silent_for(name, now) > lease_seconds:
        return shardstate.LEASE_EXPIRED
    if clock.stuck_for(name, now) > progress_deadline_seconds:
        return shardstate.NO_PROGRESS
    return None


def review(
    shards: Iterable[dict[str, Any]],
    live_pods: Collection[str],
    clock: ClaimClock,
    now: float,
    lease_seconds: int,
    progress_deadline_seconds: int,
    max_attempts: int,
    suspended: str | None = None,
) -> list[Transition]:
    """The status writes that return lost claims to Pending, or fail shards out of attempts.

    `clock` must have observed these shards (and, for stopped pods, the pods). `live_pods` must be
    listed after `shards`: a pod that claimed a shard existed before its claim, so a claim is never
    taken for orphaned because of a stale pod list. `suspended`: why the workers are being stopped
    (the job or its worker Job is suspended), if they are: then a gone holder was stopped too.
    """
    out: list[Transition] = []
    for shard in shards:
        st = shardstate.shard_status(shard)
        why = lost_claim_reason(
            shard["metadata"]["name"], st, live_pods, clock, now, lease_seconds, progress_deadline_seconds
        )
        if why is None:
            continue
        cause = clock.stopped.get(holder_pod(st.holder or "")) if why == shardstate.HOLDER_GONE else None
        if why == shardstate.HOLDER_GONE and cause is None:
            cause = suspended
        if cause is not None and cause != NODE_LOST:
            out.append(Transition(shard, shardstate.stopped(st, cause), shardstate.HOLDER_STOPPED))
        else:
            out.append(Transition(shard, shardstate.lost(st, why, max_attempts), why))
    return out
