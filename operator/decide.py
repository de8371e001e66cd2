"""The decide step of a reconcile pass: from what was observed to what to do. Pure.

Input: `Observed` (the job, its shards, pods and worker Job, as read this pass) and the little the
operator remembers (`Memory`: when it saw each claim change, the last scale-down, which pod
failures it reported). Output: a `Decision`: the shard writes, one action on the worker Job, the
Events, and the new status. reconcile.py applies it; tests/unit/test_decide.py is a table of it.

Kueue: with `spec.queueName` Kueue owns the worker Job's `suspend` (it admits by unsuspending and
preempts by suspending) and its pod count is fixed at creation, because a Job whose
`parallelism` no longer matches its admitted Workload is evicted and queued again (Kueue's
jobframework `EquivalentToWorkload`): the operator never patches an admitted Job. Idle workers
leave by themselves, so a job that needs fewer pods shrinks without an eviction. Suspending or
failing such a job deletes its worker Job, which hands the quota back at once.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from imagebatch import shardstate
from imagebatch.api import ImageBatchJobStatus, allowed_failed_items
from imagebatch.manifest import ERRORS
from imagebatch.names import (
    ANNOTATION_ITEM_COUNT,
    ANNOTATION_MANIFEST_LINES,
    ANNOTATION_SHARD_COUNT,
    EXIT_USER_ERROR,
    MODEL_LOAD_ERROR,
)
from imagebatch.operator import leases, podhealth, progress, scaling
from imagebatch.operator.conditions import Outcome, Reason, State
from imagebatch.operator.kube import EarlierIncarnationError, NotOwnedError
from imagebatch.operator.observe import Observed
from imagebatch.storage import MANIFEST
from imagebatch.timeutil import format_time, parse_time

JSON = dict[str, Any]

# A worker Job that fails (its pods crashed backoffLimit times) is replaced while work is left;
# this many replacements in a row without an image made in between fail the job (WorkersFailing).
MAX_WORKER_JOB_RESTARTS = 2
# The worker Job remembers the images done when it was made, so a replacement can tell a Job that
# crashed after making progress (count from 1 again) from a crash loop.
ANNOTATION_ITEMS_AT_START = "imagebatch.dev/items-done-at-start"


@dataclass
class Memory:
    """What a pass may know that the API does not say (all of it safe to lose on a restart)."""

    clock: leases.ClaimClock = field(default_factory=leases.ClaimClock)
    last_scale_down: float | None = None  # monotonic
    reported: set[str] = field(default_factory=set)  # pod failures already posted as Events


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class JobAction:
    kind: Literal["none", "create", "patch", "delete"] = "none"
    parallelism: int = 0  # for create
    patch: JSON = field(default_factory=dict)  # for patch: the Job's spec fields
    why: str = ""


@dataclass
class Decision:
    transitions: list[leases.Transition]
    action: JobAction
    outcome: Outcome
    status: ImageBatchJobStatus  # without throughput: reconcile adds it (its meter has memory)
    events: list[Event]
    desired: int
    scaled_down: bool
    reported: set[str]  # pod failures this decision posts
    tally: progress.Tally
    active_elapsed: float  # seconds the workers were admitted and not suspended (the deadline's clock)


@dataclass(frozen=True)
class Settings:
    cool_down: float = scaling.DEFAULT_COOL_DOWN_SECONDS
    max_step: int = scaling.DEFAULT_MAX_STEP


# -- small readings of the observation ------------------------------------------------------------
def annotation(shards: list[JSON], key: str) -> int | None:
    for s in shards:
        value = (s["metadata"].get("annotations") or {}).get(key)
        if value is not None and str(value).isdigit():
            return int(value)
    return None


def planned(shards: list[JSON]) -> bool:
    """Every shard of the plan exists (each carries the plan's shard count)."""
    return bool(shards) and annotation(shards, ANNOTATION_SHARD_COUNT) == len(shards)


def job_condition(job: JSON | None, type_: str) -> JSON | None:
    for c in ((job or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return dict(c)
    return None


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


def with_transitions(shards: list[JSON], transitions: Collection[leases.Transition]) -> list[JSON]:
    """The shards as they are once the lost claims are written (a write that loses its race is
    redone on the next pass from what the API says then)."""
    new = {tr.shard["metadata"]["name"]: tr.status for tr in transitions}
    out = []
    for s in shards:
        st = new.get(s["metadata"]["name"])
        out.append(s if st is None else {**s, "status": shardstate.dump(st)})
    return out


def active_clock(prev: ImageBatchJobStatus, active: bool, now: datetime) -> tuple[float, str | None, float]:
    """(activeSeconds, runningSince, elapsed): the deadline's clock runs only while workers may."""
    since = parse_time(prev.running_since)
    elapsed = prev.active_seconds + (max(0.0, (now - since).total_seconds()) if since else 0.0)
    if active:
        return prev.active_seconds, prev.running_since or format_time(now), elapsed
    return round(elapsed, 3), None, elapsed


# -- the decision ----------------------------------------------------------------------------------
def decide(obs: Observed, mem: Memory, settings: Settings | None = None) -> Decision:
    settings = settings or Settings()
    spec, prev, now = obs.spec, obs.prev, obs.now
    live = live_pods(obs.pods)
    r = spec.retries
    transitions = leases.review(
        obs.shards,
        live,
        mem.clock,
        obs.mono,
        r.lease_seconds,
        r.progress_deadline_seconds,
        r.max_attempts,
        suspended=_suspended(obs),
    )
    shards = with_transitions(obs.shards, transitions)
    events = [
        Event(
            "Normal" if tr.reason == shardstate.HOLDER_STOPPED else "Warning",
            tr.reason,
            f"shard {tr.shard['metadata']['name']}: {tr.status.error}"
            + ("; no attempt used" if tr.reason == shardstate.HOLDER_STOPPED else ""),
        )
        for tr in transitions
    ]

    is_planned = planned(shards)
    t = progress.tally(shards, annotation(shards, ANNOTATION_ITEM_COUNT) or 0)
    first = next((s for s in shards if int(s["spec"].get("index", -1)) == 0), None)
    joined = first is not None and ANNOTATION_MANIFEST_LINES in (first["metadata"].get("annotations") or {})
    all_done = is_planned and t.shards.done == t.shards.total
    wj = obs.worker_job

    # Pod failures: each one a Warning Event once, with the worker's own fatal error.
    failures = podhealth.failures(obs.pods)
    reported = {f"{f.uid}/{f.container}" for f in failures} - mem.reported
    events += [
        Event("Warning", "WorkerFailed", f.describe())
        for f in failures
        if f"{f.uid}/{f.container}" in reported
    ]

    # Kueue: waiting for admission is not running (and not the deadline's time).
    kueue = bool(spec.queue_name)
    admitted = wj is not None and not wj["spec"].get("suspend")
    queued = kueue and not spec.suspend and not admitted
    queue_reason, queue_message = (
        Reason.QUEUED,
        f"waiting for Kueue to admit the workers (LocalQueue {spec.queue_name})",
    )
    if queued and obs.local_queue_found is False:
        queue_reason = Reason.LOCAL_QUEUE_NOT_FOUND
        queue_message = (
            f"spec.queueName: LocalQueue {spec.queue_name!r} does not exist in namespace "
            f"{obs.meta['namespace']}; create it (kubectl get localqueues -n {obs.meta['namespace']}) "
            "or fix spec.queueName"
        )
    active_seconds, running_since, elapsed = active_clock(prev, not spec.suspend and not queued, now)

    outcome = _outcome(obs, t, is_planned, all_done, joined, elapsed, failures)
    restarts = prev.worker_job_restarts
    if outcome.failed_reason is None and not outcome.complete:
        if spec.suspend:
            outcome = Outcome(suspended=True)
        elif queued:
            outcome = Outcome(queued=True, progress_reason=queue_reason, message=queue_message)

    # -- replicas and the worker Job ---------------------------------------------------------------
    if not is_planned:
        claimable = 0 if obs.waiting_for_prompts else 1  # one worker plans the prompt file
    elif all_done and not joined:
        claimable = 1  # one worker joins the manifest
    else:
        claimable = t.shards.pending
    current = int(((wj or {}).get("spec") or {}).get("parallelism") or 0)
    scale = scaling.desired_replicas(
        claimable,
        spec.workers.shards_per_replica,
        spec.workers.min_replicas,
        spec.workers.max_replicas,
        current,
        mem.last_scale_down,
        obs.mono,
        done=outcome.finished,
        suspended=spec.suspend,
        busy=max(len(t.holders), running_pods(obs.pods)),
        cool_down=settings.cool_down,
        max_step=settings.max_step,
    )
    desired = scale.replicas
    action = JobAction()
    if obs.not_ours is not None:
        desired = 0
        if isinstance(obs.not_ours, EarlierIncarnationError):
            # The job was deleted and re-created while the garbage collector deletes the old one's
            # worker Job: run no workers until it is gone (a later pass creates them).
            if not outcome.finished and not outcome.suspended:
                outcome = Outcome(
                    progress_reason=Reason.WAITING_FOR_EARLIER_INCARNATION, message=str(obs.not_ours)
                )
        elif isinstance(obs.not_ours, NotOwnedError):
            outcome = Outcome(failed_reason=Reason.WORKER_JOB_NOT_OWNED, message=str(obs.not_ours))
    elif wj is not None and wj["metadata"].get("deletionTimestamp"):
        pass  # being replaced: the new one is made on a later pass
    elif wj is not None and (job_condition(wj, "Complete") or job_condition(wj, "Failed")):
        # A finished Job makes no pods; when work is left (a shard came back after its workers
        # exited, or crashes used up backoffLimit) a new one takes over, a bounded number of times.
        if desired > 0 and not outcome.finished:
            failed_job = job_condition(wj, "Failed")
            if failed_job is not None:
                at_start = int((wj["metadata"].get("annotations") or {}).get(ANNOTATION_ITEMS_AT_START) or 0)
                restarts = 1 if t.items.done > at_start else restarts + 1
            if restarts > MAX_WORKER_JOB_RESTARTS:
                last = failures[-1].describe() if failures else f"{failed_job or {}}"
                outcome = Outcome(
                    failed_reason=Reason.WORKERS_FAILING,
                    message=(
                        f"the worker Job failed {restarts} times in a row without an image made in "
                        f"between; last failure: {last}"
                    ),
                )
                desired = 0
            else:
                action = JobAction("delete", why="worker Job finished with work left; replacing it")
    elif wj is None:
        if desired > 0:
            # With Kueue the pod count is fixed at admission: ask for what the backlog may use.
            n = _queued_parallelism(spec.workers.max_replicas, is_planned, t) if kueue else desired
            action = JobAction("create", parallelism=n)
            desired = n
    elif kueue:
        desired = current
        if spec.suspend or outcome.failed_reason is not None:
            # Not a parallelism change (that would be an eviction): the Job goes, with its quota.
            action = JobAction(
                "delete", why="suspended or failed: deleting the worker Job hands back its quota"
            )
            desired = 0
        elif admitted and prev.state == State.QUEUED:
            events.append(
                Event(
                    "Normal",
                    "Resumed" if prev.active_seconds > 0 else "Admitted",
                    "Kueue admitted the workers",
                )
            )
        elif not admitted and prev.state == State.RUNNING and prev.running_since:
            events.append(
                Event(
                    "Normal",
                    "Preempted",
                    "Kueue suspended the workers (preempted or evicted; see `kubectl describe workloads`): "
                    "claims are released without using attempts, the job resumes when admitted again",
                )
            )
    else:
        patch: JSON = {}
        if desired != current:
            patch["parallelism"] = desired
        if bool(wj["spec"].get("suspend")) != spec.suspend:
            patch["suspend"] = spec.suspend
        if patch:
            action = JobAction("patch", patch=patch)
            if desired > current:
                events.append(Event("Normal", "ScaledUp", f"workers {current} -> {desired}"))
            elif desired < current:
                events.append(Event("Normal", "ScaledDown", f"workers {current} -> {desired}"))
    if action.kind == "create":
        events.append(Event("Normal", "ScaledUp", f"started worker Job with {action.parallelism} workers"))

    # Worker pods that do not run, while the job wants them to.
    if not outcome.finished and not outcome.suspended and not outcome.queued:
        outcome = Outcome(
            progress_reason=outcome.progress_reason,
            message=outcome.message,
            problem=podhealth.problem(obs.pods),
        )

    status = prev.model_copy(
        update={
            "observed_generation": obs.meta.get("generation"),
            "state": str(outcome.state),
            "reason": str(outcome.reason),
            "items": t.items,
            "shards": t.shards,
            "progress": progress.progress_text(t.items),
            "desired_replicas": 0 if outcome.finished else desired,
            "active_replicas": len(live),
            "ready": f"{running_pods(obs.pods)}/{0 if outcome.finished else desired}",
            "start_time": prev.start_time or format_time(now),
            "active_seconds": active_seconds,
            "running_since": None if outcome.finished else running_since,
            "worker_job_restarts": restarts,
        }
    )
    if outcome.finished:
        status.completion_time = status.completion_time or format_time(now)
    if outcome.complete:
        status.manifest = f"{spec.output.uri.rstrip('/')}/{MANIFEST}"
    if outcome.finished and joined and t.item_failures:
        status.errors = f"{spec.output.uri.rstrip('/')}/{ERRORS}"
    return Decision(
        transitions=transitions,
        action=action,
        outcome=outcome,
        status=status,
        events=events,
        desired=status.desired_replicas,
        scaled_down=scale.scaled_down and action.kind == "patch",
        reported=reported,
        tally=t,
        active_elapsed=elapsed,
    )


def _suspended(obs: Observed) -> str | None:
    """Why the workers are being stopped on purpose now, if they are (a gone claim holder was
    stopped, not crashed)."""
    if obs.spec.suspend:
        return "spec.suspend"
    if obs.worker_job is not None and obs.worker_job["spec"].get("suspend"):
        return "its worker Job was suspended: Kueue preemption or eviction"
    return None


def _queued_parallelism(max_replicas: int, planned: bool, t: progress.Tally) -> int:
    if not planned:
        return max_replicas
    return max(1, min(max_replicas, t.shards.pending + t.shards.claimed))


def _outcome(
    obs: Observed,
    t: progress.Tally,
    planned: bool,
    all_done: bool,
    joined: bool,
    elapsed: float,
    failures: list[podhealth.PodFailure],
) -> Outcome:
    spec = obs.spec
    if t.shards.failed:
        model_errors = [e for e in t.errors if f": {MODEL_LOAD_ERROR}" in e]
        if model_errors:
            msg = model_errors[0].split(f": {MODEL_LOAD_ERROR}: ", 1)[-1]
            return Outcome(failed_reason=Reason.MODEL_LOAD_ERROR, message=msg)
        return Outcome(
            failed_reason=Reason.SHARDS_FAILED,
            message=(
                f"{t.shards.failed} of {t.shards.total} shards ({t.items.failed - t.item_failures} images) "
                f"failed (retries.maxAttempts={spec.retries.max_attempts}); first error: {t.errors[0]}"
            ),
        )
    if all_done and joined:
        root = spec.output.uri.rstrip("/")
        if t.item_failures:
            limit = spec.retries.max_failed_items
            allowed = allowed_failed_items(limit, t.items.total)
            listed = f"every failed item and its error: {root}/{ERRORS}"
            first = ", ".join(t.failed_items)
            if t.item_failures > allowed:
                return Outcome(
                    failed_reason=Reason.ITEMS_FAILED,
                    message=(
                        f"{t.item_failures} of {t.items.total} items failed, more than "
                        f"retries.maxFailedItems={limit} allows ({allowed}); first: {first}; {listed}; "
                        f"the other {t.items.done} images are stored (imagebatch retry-failed makes the failed ones again)"
                    ),
                )
            return Outcome(
                complete=True,
                message=(
                    f"{t.items.done} images, {t.item_failures} failed (first: {first}; {listed}); "
                    f"manifest at {root}/{MANIFEST}"
                ),
            )
        return Outcome(complete=True, message=f"{t.items.done} images; manifest at {root}/{MANIFEST}")
    if spec.active_deadline_seconds and elapsed > spec.active_deadline_seconds:
        return Outcome(
            failed_reason=Reason.DEADLINE_EXCEEDED,
            message=(
                f"not complete after spec.activeDeadlineSeconds={spec.active_deadline_seconds}s of running "
                f"(time queued or suspended not counted; {t.items.done}/{t.items.total} images)"
            ),
        )
    if not planned:
        # The planning worker's own words: a prompt file it cannot read or plan.
        user_errors = [f for f in failures if f.exit_code == EXIT_USER_ERROR and f.message.strip()]
        failed_job = job_condition(obs.worker_job, "Failed")
        if user_errors:
            return Outcome(failed_reason=Reason.PLANNING_FAILED, message=user_errors[-1].message.strip())
        if failed_job is not None:
            last = (
                failures[-1].describe()
                if failures
                else f"{failed_job.get('reason')}: {failed_job.get('message')}"
            )
            return Outcome(
                failed_reason=Reason.PLANNING_FAILED,
                message=f"the worker could not read or plan the prompts: {last}",
            )
    if obs.waiting_for_prompts:
        return Outcome(progress_reason=Reason.WAITING_FOR_PROMPTS, message=obs.waiting_for_prompts)
    if not planned:
        return Outcome(
            progress_reason=Reason.PLANNING, message="a worker is reading the prompt file and planning shards"
        )
    if all_done:
        return Outcome(progress_reason=Reason.JOINING, message="joining the manifest parts")
    return Outcome(progress_reason=Reason.RUNNING, message=f"{t.items.done}/{t.items.total} images")
