"""How many worker pods a job wants, and what to do to its worker Job. Pure: the one room for it.

Replicas: `clamp(ceil(claimable / shardsPerReplica), minReplicas, maxReplicas)`; up at once (a
backlog waiting on GPUs is the expensive case), down damped: only after `cool_down` seconds since
the last scale-down, and by at most `max_step` pods, because a worker cut off mid-shard loses its
batch, and a backlog that flickers must not make pods churn. Never below the workers that started
(the Job controller picks its victims blindly; idle workers leave by themselves). Zero when done,
suspended, or when the worker Job is not this job's.

Kueue (`spec.queueName`): Kueue owns the worker Job's `suspend` (it admits by unsuspending and
preempts by suspending) and its pod count is fixed at creation, because a Job whose `parallelism`
no longer matches its admitted Workload is evicted and queued again (Kueue's jobframework
`EquivalentToWorkload`): an admitted Job is never patched. Idle workers leave by themselves, so a
job that needs fewer pods shrinks without an eviction. Suspending or failing such a job deletes
its worker Job, which hands the quota back at once.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from imagebatch.api import ImageBatchJobSpec
from imagebatch.operator.conditions import Outcome
from imagebatch.operator.observed import Observed
from imagebatch.operator.plan import Action, CreateWorkers, DeleteWorkers, PatchWorkers, PostEvent
from imagebatch.operator.progress import Tally
from imagebatch.reasons import EventReason, State
from imagebatch.shardstate import shard_status

JSON = dict[str, Any]

DEFAULT_COOL_DOWN_SECONDS = 30.0
DEFAULT_MAX_STEP = 2
# A worker Job that fails (its pods crashed backoffLimit times) is replaced while work is left;
# this many replacements in a row without an image made in between fail the job (WorkersFailing).
MAX_WORKER_JOB_RESTARTS = 2
# The worker Job remembers the images done when it was made, so a replacement can tell a Job that
# crashed after making progress (count from 1 again) from a crash loop.
ANNOTATION_ITEMS_AT_START = "imagebatch.dev/items-done-at-start"
# What a queued worker Job asks Kueue for (see `shape`), so that one never admitted can be made
# again when spec.workers changes.
ANNOTATION_SHAPE = "imagebatch.dev/workers-shape"


@dataclass(frozen=True)
class Settings:
    cool_down: float = DEFAULT_COOL_DOWN_SECONDS
    max_step: int = DEFAULT_MAX_STEP


# -- the replica count ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleDecision:
    replicas: int
    scaled_down: bool  # True when this decision lowered the count (restart the cool-down)


def target_replicas(claimable: int, shards_per_replica: int, min_replicas: int, max_replicas: int) -> int:
    """The undamped target for a backlog of `claimable` shards; 0 when there is no backlog."""
    if claimable <= 0:
        return 0
    want = math.ceil(claimable / max(1, shards_per_replica))
    return max(min_replicas, min(max_replicas, want))


def desired_replicas(
    claimable: int,
    shards_per_replica: int,
    min_replicas: int,
    max_replicas: int,
    current: int,
    last_scale_down_time: float | None,
    now: float,
    *,
    done: bool = False,
    suspended: bool = False,
    busy: int = 0,
    cool_down: float = DEFAULT_COOL_DOWN_SECONDS,
    max_step: int = DEFAULT_MAX_STEP,
) -> ScaleDecision:
    """The replica count to apply now. `busy`: the workers that started or hold a claim."""
    if done or suspended:
        return ScaleDecision(0, current > 0)
    target = max(
        target_replicas(claimable, shards_per_replica, min_replicas, max_replicas), min(busy, max_replicas)
    )
    if target >= current:
        return ScaleDecision(target, False)
    if last_scale_down_time is not None and now - last_scale_down_time < cool_down:
        return ScaleDecision(current, False)
    return ScaleDecision(max(target, current - max_step), True)


def shape(spec: ImageBatchJobSpec, parallelism: int) -> str:
    """A digest of what a queued worker Job asks Kueue for: its pod count, the fewest it may be
    admitted with (partial admission) and each pod's resources."""
    w = spec.workers
    asked = [parallelism, max(1, w.min_replicas), w.resources or {}, w.gpus_per_worker]
    return hashlib.sha256(json.dumps(asked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def queued_parallelism(max_replicas: int, planned: bool, t: Tally) -> int:
    """Under Kueue the pod count is fixed at admission: ask for what the backlog may use."""
    if not planned:
        return max_replicas
    return max(1, min(max_replicas, t.shards.pending + t.shards.claimed))


# -- readings of pods and the worker Job -----------------------------------------------------------------
def job_condition(job: JSON | None, type_: str) -> JSON | None:
    for c in ((job or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return dict(c)
    return None


def job_finished(wj: JSON | None) -> JSON | None:
    """The worker Job's Complete or Failed condition: a finished Job makes no more pods."""
    return job_condition(wj, "Complete") or job_condition(wj, "Failed")


def live_pods(pods: list[JSON]) -> set[str]:
    # A pod being deleted still runs its worker until the grace period ends: it is live.
    return {
        p["metadata"]["name"]
        for p in pods
        if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    }


def running_pods(pods: list[JSON]) -> int:
    """Worker pods that started. Scaling below them would let the Job controller pick victims
    blindly among busy workers; idle ones exit by themselves. Pods not yet started can be cut."""
    return sum(
        1
        for p in pods
        if (p.get("status") or {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    )


def stranded(obs: Observed, holders: set[str]) -> bool:
    """Shards are Pending and no worker is left to take them, although the worker Job runs: one
    of its pods succeeded (a work-queue Job then makes no new pods), none of its live pods holds a
    claim (a busy worker looks again after its shard) and none is still starting. The live ones
    are hung or leaving. Counted on the shards as observed, not as this pass returned them: a
    claim returned a pass ago had that long to be taken by a worker between two shards."""
    wj = obs.worker_job
    if wj is None or int((wj.get("status") or {}).get("succeeded") or 0) == 0:
        return False
    if not any(shard_status(s).state == "Pending" for s in obs.shards):
        return False
    live = [p for p in obs.pods if p["metadata"]["name"] in live_pods(obs.pods)]
    starting = [p for p in live if (p.get("status") or {}).get("phase") != "Running"]
    return not starting and not holders & {p["metadata"]["name"] for p in live}


# -- the worker Job's action --------------------------------------------------------------------
@dataclass(frozen=True)
class Backlog:
    """What the workers have to do, as a pass counted it."""

    claimable: int  # shards a new worker could take now (planning and joining count as one)
    planned: bool
    tally: Tally


@dataclass
class WorkersPlan:
    desired: int
    actions: list[Action] = field(default_factory=list)
    restarts: int = 0  # worker Jobs replaced in a row without an image made in between
    failing: str | None = None  # the message of WorkersFailing, when the restarts ran out


def plan(
    obs: Observed,
    backlog: Backlog,
    outcome: Outcome,
    last_scale_down: float | None,
    settings: Settings,
    last_failure: str,
) -> WorkersPlan:
    """The replica count and the one action on the worker Job, for a job that is not finished."""
    assert obs.spec is not None
    spec, prev, wj, t = obs.spec, obs.prev, obs.worker_job, backlog.tally
    workers, suspend, kueue = spec.workers, spec.suspend, bool(spec.queue_name)
    current = int(((wj or {}).get("spec") or {}).get("parallelism") or 0)
    scale = desired_replicas(
        backlog.claimable,
        workers.shards_per_replica,
        workers.min_replicas,
        workers.max_replicas,
        current,
        last_scale_down,
        obs.mono,
        done=outcome.finished,
        suspended=suspend,
        busy=max(len(t.holders), running_pods(obs.pods)),
        cool_down=settings.cool_down,
        max_step=settings.max_step,
    )
    out = WorkersPlan(desired=scale.replicas, restarts=prev.worker_job_restarts)
    if obs.not_ours is not None or obs.refused is not None:
        out.desired = 0  # not this incarnation's Job (or nobody's we may touch): run nothing
    elif wj is not None and wj["metadata"].get("deletionTimestamp"):
        pass  # being replaced: the new one is made on a later pass
    elif wj is not None and job_finished(wj):
        # A finished Job makes no pods; when work is left (a shard came back after its workers
        # exited, or crashes used up backoffLimit) a new one takes over, a bounded number of times.
        if out.desired > 0 and not outcome.finished:
            failed_job = job_condition(wj, "Failed")
            if failed_job is not None:
                at_start = int((wj["metadata"].get("annotations") or {}).get(ANNOTATION_ITEMS_AT_START) or 0)
                out.restarts = 1 if t.items.done > at_start else out.restarts + 1
            if out.restarts > MAX_WORKER_JOB_RESTARTS:
                out.failing = (
                    f"the worker Job failed {out.restarts} times in a row without an image made in "
                    f"between; last failure: {last_failure or failed_job}"
                )
                out.desired = 0
            else:
                out.actions.append(DeleteWorkers("worker Job finished with work left; replacing it"))
    elif (
        not suspend
        and outcome.failed_reason is None
        and wj is not None
        and not wj["spec"].get("suspend")
        and stranded(obs, t.holders)
    ):
        # Every other worker left (quota follows the backlog) and a claim came back; the live pods
        # cannot take it. Deleting the Job stops them (nothing to release) and the next pass makes
        # a new one for the backlog (under Kueue it queues again for its quota).
        out.actions.append(DeleteWorkers("shards came back after the workers left; replacing the worker Job"))
    elif wj is None:
        if out.desired > 0 and kueue and obs.earlier_workload:
            pass  # the last worker Job's Workload is still being deleted: make the new one after
        elif out.desired > 0:
            n = queued_parallelism(workers.max_replicas, backlog.planned, t) if kueue else out.desired
            out.desired = n
            out.actions += [
                CreateWorkers(n, t.items.done, spec),
                PostEvent("Normal", EventReason.SCALED_UP, f"started worker Job with {n} workers"),
            ]
    elif kueue:
        out.desired = current
        admitted = not wj["spec"].get("suspend")
        if suspend or outcome.failed_reason is not None:
            # Not a parallelism change (that would be an eviction): the Job goes, with its quota.
            out.actions.append(
                DeleteWorkers("suspended or failed: deleting the worker Job hands back its quota")
            )
            out.desired = 0
        elif not admitted and never_admitted(obs) and _reshaped(wj, spec, backlog):
            # Nothing was admitted, so nothing is evicted: a Job of the new size queues instead.
            out.actions.append(
                DeleteWorkers("spec.workers changed before Kueue admitted the workers; making it again")
            )
            out.desired = 0
        elif admitted and prev.state == State.QUEUED:
            reason = EventReason.RESUMED if prev.active_seconds > 0 else EventReason.ADMITTED
            out.actions.append(PostEvent("Normal", reason, "Kueue admitted the workers"))
        elif not admitted and prev.state == State.RUNNING and prev.running_since:
            out.actions.append(
                PostEvent(
                    "Normal",
                    EventReason.PREEMPTED,
                    "Kueue suspended the workers (preempted or evicted; see `kubectl describe workloads`): "
                    "claims are released without using attempts, the job resumes when admitted again",
                )
            )
    else:
        patch: JSON = {}
        if out.desired != current:
            patch["parallelism"] = out.desired
        if bool(wj["spec"].get("suspend")) != suspend:
            patch["suspend"] = suspend
        if patch:
            out.actions.append(PatchWorkers(patch, scaled_down=scale.scaled_down))
            if out.desired > current:
                out.actions.append(
                    PostEvent("Normal", EventReason.SCALED_UP, f"workers {current} -> {out.desired}")
                )
            elif out.desired < current:
                out.actions.append(
                    PostEvent("Normal", EventReason.SCALED_DOWN, f"workers {current} -> {out.desired}")
                )
    return out


def never_admitted(obs: Observed) -> bool:
    """Queued since it began: Kueue never admitted this job's workers (nothing ran)."""
    prev = obs.prev
    return prev.state == State.QUEUED and prev.active_seconds == 0 and not prev.running_since


def _reshaped(wj: JSON, spec: ImageBatchJobSpec, backlog: Backlog) -> bool:
    made = (wj["metadata"].get("annotations") or {}).get(ANNOTATION_SHAPE)
    now = shape(spec, queued_parallelism(spec.workers.max_replicas, backlog.planned, backlog.tally))
    return made is not None and made != now  # a Job without one (an older operator's) stays


def after_the_end(worker_job: JSON | None, kueue: bool) -> Action | None:
    """A finished job runs no workers: its worker Job goes to 0 pods, or, under Kueue (where a
    parallelism change would make Kueue evict and queue it again), is deleted."""
    wj = worker_job
    if wj is None or wj["metadata"].get("deletionTimestamp") or job_finished(wj):
        return None
    if kueue:
        return DeleteWorkers("finished: deleting the worker Job hands back its quota")
    if int(wj["spec"].get("parallelism") or 0) > 0:
        return PatchWorkers({"parallelism": 0})
    return None
