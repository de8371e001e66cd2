"""What a job is doing, as one pass judges it: its Outcome (conditions, STATE, REASON). Pure.

In order of precedence: failed for good (shards or items out of retries, a model that does not
load, the deadline, a prompt file that cannot be planned, an object the job must not touch),
complete, suspended, queued for Kueue, waiting for an earlier incarnation or for its prompts, and
working (planning, running, joining). Worker pods that do not run are a problem on top of a
working outcome (the WorkersHealthy condition), never an outcome of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagebatch.api import allowed_failed_items
from imagebatch.names import ERRORS, EXIT_USER_ERROR, MANIFEST, MODEL_LOAD_ERROR
from imagebatch.operator import podhealth
from imagebatch.operator.conditions import Outcome, WorkerProblem
from imagebatch.operator.observed import Observed, Refusal
from imagebatch.operator.progress import Tally
from imagebatch.operator.workers import job_condition
from imagebatch.reasons import Reason


@dataclass(frozen=True)
class Work:
    """The shards as this pass counted them (after its lease transitions)."""

    tally: Tally
    planned: bool  # every shard of the plan exists
    joined: bool  # the manifest parts are joined (shard 0 says so)

    @property
    def all_done(self) -> bool:
        return self.planned and self.tally.shards.done == self.tally.shards.total


def refusal(r: Refusal) -> Outcome:
    """An object of this job's name it must not touch: wait for an earlier incarnation's to go,
    fail on someone else's (never adopt it: it may hold or grant more than the job should get)."""
    if r.whose == "earlier":
        return Outcome(progress_reason=Reason.WAITING_FOR_EARLIER_INCARNATION, message=r.message)
    reason = {
        "ImageBatchShard": Reason.SHARD_NOT_OWNED,
        "Job": Reason.WORKER_JOB_NOT_OWNED,
    }.get(r.kind, Reason.WORKER_RBAC_NOT_OWNED)
    return Outcome(failed_reason=reason, message=r.message)


def queue_wait(obs: Observed) -> Outcome:
    """Waiting for Kueue to admit the workers: what for, in the queue's words."""
    assert obs.spec is not None
    q, ns, wl = obs.spec.queue_name, obs.meta["namespace"], obs.workload
    if not obs.kueue_installed:
        return Outcome(
            queued=True,
            progress_reason=Reason.KUEUE_NOT_INSTALLED,
            message=(
                "spec.queueName is set but Kueue is not installed in this cluster (the API serves no "
                "kueue.x-k8s.io LocalQueues): remove spec.queueName to run without Kueue, or install Kueue"
            ),
        )
    if obs.local_queue_found is False:
        return Outcome(
            queued=True,
            progress_reason=Reason.LOCAL_QUEUE_NOT_FOUND,
            message=(
                f"spec.queueName: LocalQueue {q!r} does not exist in namespace {ns}; create it "
                f"(kubectl get localqueues -n {ns}) or fix spec.queueName"
            ),
        )
    if wl is not None and wl.exceeds_capacity:
        least = wl.pods if wl.min_pods is None else wl.min_pods
        return Outcome(
            queued=True,
            progress_reason=Reason.NEVER_ADMITTABLE,
            message=(
                f"Kueue can never admit the workers (LocalQueue {q}): {'; '.join(wl.quota)}; the "
                f"fewest it may admit ({least}) ask more than that. Lower spec.workers.maxReplicas (and "
                "minReplicas) or the requests in spec.workers.resources: the worker Job is made again "
                "at the new size"
            ),
        )
    message = f"waiting for Kueue to admit the workers (LocalQueue {q})"
    if wl is not None and wl.quota:
        message += f": {'; '.join(wl.quota)}"
    if wl is not None and wl.min_pods is not None and wl.min_pods < wl.pods:
        message += f"; Kueue may start {wl.min_pods} of the {wl.pods} (workers.minReplicas)"
    return Outcome(queued=True, progress_reason=Reason.QUEUED, message=message)


def is_queued(obs: Observed) -> bool:
    """Under Kueue and not admitted: waiting is not running (and not the deadline's time)."""
    assert obs.spec is not None
    admitted = obs.worker_job is not None and not obs.worker_job["spec"].get("suspend")
    return bool(obs.spec.queue_name) and not obs.spec.suspend and not admitted


def outcome(obs: Observed, w: Work, elapsed: float, failures: list[podhealth.PodFailure]) -> Outcome:
    """The outcome before the workers' part (workers.py may still find them failing)."""
    assert obs.spec is not None
    o = _progress(obs, w, elapsed, failures)
    if not o.finished:
        if obs.spec.suspend:
            o = Outcome(suspended=True)
        elif is_queued(obs):
            o = queue_wait(obs)
    for r in (obs.not_ours, obs.refused):
        if r is None:
            continue
        judged = refusal(r)
        if judged.failed_reason is not None or not (o.finished or o.suspended):
            o = judged
    return o


def with_workers(o: Outcome, failing: str | None, problem: WorkerProblem | None) -> Outcome:
    """The outcome once the workers' part is known: failing for good, or a pod problem on top."""
    if failing is not None and not o.finished:
        return Outcome(failed_reason=Reason.WORKERS_FAILING, message=failing)
    if o.finished or o.suspended or o.queued:
        return o
    return Outcome(progress_reason=o.progress_reason, message=o.message, problem=problem)


def _progress(obs: Observed, w: Work, elapsed: float, failures: list[podhealth.PodFailure]) -> Outcome:
    assert obs.spec is not None
    spec, t = obs.spec, w.tally
    root = spec.output.uri.rstrip("/")
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
    if w.all_done and w.joined:
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
    waiting = obs.prompts.waiting if obs.prompts is not None else None
    if not w.planned and waiting is None:
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
    if waiting is not None:
        return Outcome(progress_reason=Reason.WAITING_FOR_PROMPTS, message=waiting)
    if not w.planned:
        return Outcome(
            progress_reason=Reason.PLANNING, message="a worker is reading the prompt file and planning shards"
        )
    if w.all_done:
        return Outcome(progress_reason=Reason.JOINING, message="joining the manifest parts")
    return Outcome(progress_reason=Reason.RUNNING, message=f"{t.items.done}/{t.items.total} images")
