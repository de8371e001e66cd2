"""The decide step of a reconcile pass: from what was observed to a Plan. Total and pure.

Every pass goes through `decide`: a job the operator cannot process, a finished job (its workers
go, its TTL), an invalid spec, prompts to plan, and a working job. It returns the complete new
status and the actions that make the world match it (plan.py); reconcile.py only carries them
out. The decision has three rooms, one concern each:

  1. leases.review    which claims are lost (their holder gone, silent, or out of time)
  2. lifecycle.py     what the job is doing: its Outcome (conditions, STATE, REASON)
  3. workers.py       how many workers, and the one action on the worker Job (Kueue included)
  4. status.py        the new status, and the Events its condition changes post

tests/unit/test_decide.py is a table of it, with a case for every Reason.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from imagebatch import shardstate
from imagebatch.api import ImageBatchJobStatus
from imagebatch.errors import ImageBatchError
from imagebatch.names import ANNOTATION_ITEM_COUNT, ANNOTATION_MANIFEST_LINES, ERRORS, MANIFEST
from imagebatch.operator import conditions, leases, lifecycle, podhealth, progress, status, workers
from imagebatch.operator.conditions import COMPLETE, FAILED, Outcome
from imagebatch.operator.lifecycle import Work
from imagebatch.operator.observed import Observed, Refusal
from imagebatch.operator.plan import Action, CreateShards, DeleteJob, Plan, PostEvent, WriteShardStatus
from imagebatch.reasons import EventReason, Reason
from imagebatch.shardplan import annotation, plan_complete, shard_manifests
from imagebatch.timeutil import format_time, parse_time

JSON = dict[str, Any]
Settings = workers.Settings


@dataclass
class Memory:
    """What a pass may know that the API does not say (all of it safe to lose on a restart)."""

    clock: leases.ClaimClock = field(default_factory=leases.ClaimClock)
    last_scale_down: float | None = None  # monotonic
    reported: set[str] = field(default_factory=set)  # what Events already reported, once each
    refused: Refusal | None = None  # what the last pass's actions met; the next pass observes it
    # images/s from the items done seen at each pass; empty after a restart
    rate: progress.RateMeter = field(default_factory=progress.RateMeter)
    making: progress.MakingRate = field(default_factory=progress.MakingRate)


def decide(obs: Observed, mem: Memory, settings: Settings | None = None) -> Plan:
    settings = settings or Settings()
    if obs.cannot_reconcile is not None:
        return _ended(obs, _cannot_reconcile(obs.cannot_reconcile))
    if obs.finished:
        return _finished(obs)
    if obs.spec is None:
        return _ended(obs, Outcome(failed_reason=Reason.INVALID_SPEC, message=obs.invalid_spec or ""))
    if obs.refused is not None and obs.refused.kind == "ImageBatchShard":
        return _ended(obs, lifecycle.refusal(obs.refused))
    p = obs.prompts
    if p is not None and p.error is not None:
        return _ended(obs, Outcome(failed_reason=Reason.INVALID_PROMPTS, message=p.error))
    if p is not None and p.items is not None:
        return _plan_shards(obs, p.items)
    return _working(obs, mem, settings)


# -- the paths ----------------------------------------------------------------------------------
def _cannot_reconcile(error_type: str) -> Outcome:
    # Names the error's type only: its text may quote the job's own content.
    return Outcome(
        failed_reason=Reason.CANNOT_RECONCILE,
        message=(
            f"the operator cannot process this job: its passes keep failing with {error_type}; "
            "it keeps serving every other job. Check the job's spec against `kubectl explain ibj.spec` "
            "and re-create it, or ask the cluster admin (the operator's log has the details)"
        ),
    )


def _ended(obs: Observed, outcome: Outcome, actions: list[Action] | None = None) -> Plan:
    """A pass that judges the job without counting its shards (it fails before any runs)."""
    new = status.build(obs.prev, outcome, obs.meta.get("generation"), obs.now)
    return Plan(new, [*(actions or []), *status.transition_events(obs.prev.conditions, new.conditions)])


def _finished(obs: Observed) -> Plan:
    """A finished job keeps its outcome: no workers; deleted after ttlSecondsAfterFinished."""
    prev = obs.prev
    complete = conditions.is_true(prev.conditions, COMPLETE)
    final = conditions.find(prev.conditions, COMPLETE if complete else FAILED)  # True: obs.finished
    message = final.message if final is not None else ""
    outcome = (
        Outcome(complete=True, message=message)
        if complete
        else Outcome(
            failed_reason=final.reason if final is not None else Reason.CANNOT_RECONCILE, message=message
        )
    )
    actions: list[Action] = []
    if (stop := workers.after_the_end(obs.worker_job, bool(obs.queue_name))) is not None:
        actions.append(stop)
    live = len(workers.live_pods(obs.pods))
    # Workers leave after the end: keep the Replicas column honest, nothing else changes.
    fields = {"active_replicas": live, "ready": f"{live}/0"} if live != prev.active_replicas else {}
    new = status.build(prev, outcome, obs.meta.get("generation"), obs.now, **fields)
    ttl, done_at = obs.ttl_seconds_after_finished, parse_time(prev.completion_time)
    if ttl is not None and done_at is not None and (obs.now - done_at).total_seconds() >= ttl:
        actions.append(DeleteJob(f"ttlSecondsAfterFinished={ttl} has passed"))
    return Plan(new, actions)


def _plan_shards(obs: Observed, items: int) -> Plan:
    """Inline and ConfigMap prompts: the operator makes the shards; the next pass runs them."""
    assert obs.spec is not None
    try:
        manifests = shard_manifests(obs.job, items, obs.spec.batching.shard_size)
    except ImageBatchError as e:  # too many shards: the message names the field and its least value
        return _ended(obs, Outcome(failed_reason=Reason.INVALID_PROMPTS, message=str(e)))
    outcome = Outcome(progress_reason=Reason.PLANNING, message=f"planning {items} images")
    plan = _ended(
        obs,
        outcome,
        [
            CreateShards(manifests),
            PostEvent(
                "Normal", EventReason.CREATED_SHARDS, f"planned {items} images in {len(manifests)} shards"
            ),
        ],
    )
    plan.status.start_time = obs.prev.start_time or format_time(obs.now)
    plan.again = True
    return plan


def _working(obs: Observed, mem: Memory, settings: Settings) -> Plan:
    assert obs.spec is not None
    spec, prev, now = obs.spec, obs.prev, obs.now
    actions: list[Action] = []
    reported: set[str] = set()

    # 1. lost claims
    r = spec.retries
    live = workers.live_pods(obs.pods)
    transitions = leases.review(
        obs.shards,
        live,
        obs.clock,
        obs.mono,
        r.lease_seconds,
        r.progress_deadline_seconds,
        r.max_attempts,
        suspended=_stopping(obs),
    )
    for tr in transitions:
        stopped = tr.reason == shardstate.HOLDER_STOPPED
        actions.append(WriteShardStatus(tr.shard, tr.status, EventReason(tr.reason)))
        actions.append(
            PostEvent(
                "Normal" if stopped else "Warning",
                EventReason(tr.reason),
                f"shard {tr.shard['metadata']['name']}: {tr.status.error}"
                + ("; no attempt used" if stopped else ""),
            )
        )
    shards = with_transitions(obs.shards, transitions)
    t = progress.tally(shards, annotation(shards, ANNOTATION_ITEM_COUNT) or 0)
    first = next((s for s in shards if int(s["spec"].get("index", -1)) == 0), None)
    joined = first is not None and ANNOTATION_MANIFEST_LINES in (first["metadata"].get("annotations") or {})
    work = Work(t, plan_complete(shards), joined)

    # Shards that carry this job's UID label and are not its own: said once each, never counted.
    for name, why in sorted(obs.forged.items()):
        if (key := f"forged/{name}") not in mem.reported:
            reported.add(key)
            actions.append(
                PostEvent(
                    "Warning",
                    EventReason.FORGED_SHARD_IGNORED,
                    f"ImageBatchShard {name} carries this job's UID label but {why}; it is not counted, "
                    "claimed or adopted (neither this job's operator nor its workers made it)",
                )
            )
    # Pod failures: each one a Warning Event once, with the worker's own fatal error.
    failures = podhealth.failures(obs.pods)
    for f in failures:
        if (key := f"{f.uid}/{f.container}") not in mem.reported:
            reported.add(key)
            actions.append(PostEvent("Warning", EventReason.WORKER_FAILED, f.describe()))

    # 2. the outcome
    queued = lifecycle.is_queued(obs)
    active_seconds, running_since, elapsed = active_clock(prev, not spec.suspend and not queued, now)
    outcome = lifecycle.outcome(obs, work, elapsed, failures)

    # 3. the workers
    if not work.planned:
        claimable = 0 if obs.prompts is not None and obs.prompts.waiting else 1  # one worker plans a file
    elif work.all_done and not joined:
        claimable = 1  # one worker joins the manifest
    else:
        claimable = t.shards.pending
    last_failure = failures[-1].describe() if failures else ""
    wp = workers.plan(
        obs, workers.Backlog(claimable, work.planned, t), outcome, mem.last_scale_down, settings, last_failure
    )
    actions += wp.actions
    outcome = lifecycle.with_workers(outcome, wp.failing, podhealth.problem(obs.pods))

    # 4. the status
    desired = 0 if outcome.finished else wp.desired
    root = spec.output.uri.rstrip("/")
    rate = obs.images_per_second
    remaining = t.items.total - t.items.done - t.items.failed
    new = status.build(
        prev,
        outcome,
        obs.meta.get("generation"),
        now,
        items=t.items,
        shards=t.shards,
        progress=progress.progress_text(t.items),
        desired_replicas=desired,
        active_replicas=len(live),
        ready=f"{workers.running_pods(obs.pods)}/{desired}",
        start_time=prev.start_time or format_time(now),
        active_seconds=active_seconds,
        running_since=running_since,
        worker_job_restarts=wp.restarts,
        images_per_second=f"{rate:.2f}",
        eta=progress.eta(remaining, rate),
        manifest=f"{root}/{MANIFEST}" if outcome.complete else prev.manifest,
        errors=f"{root}/{ERRORS}" if outcome.finished and joined and t.item_failures else prev.errors,
    )
    actions += status.transition_events(prev.conditions, new.conditions)
    return Plan(new, actions, reported, tally=t)


# -- small readings of the observation ------------------------------------------------------------
def _stopping(obs: Observed) -> str | None:
    """Why the workers are being stopped on purpose now, if they are (a gone claim holder was
    stopped, not crashed)."""
    assert obs.spec is not None
    if obs.spec.suspend:
        return "spec.suspend"
    if obs.worker_job is not None and obs.worker_job["spec"].get("suspend"):
        return "its worker Job was suspended: Kueue preemption or eviction"
    return None


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
