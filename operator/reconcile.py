"""One reconcile pass of an ImageBatchJob: observe, decide, apply, write status (in one place).

Level-based: every pass starts from what the API says now, so a pass that is skipped, repeated or
run by a freshly restarted operator reaches the same result. The only memory kept between passes
is the time of the last scale-down (for damping; losing it only makes the next scale-down earlier).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from imagebatch.api import Condition, ImageBatchJobSpec, ImageBatchJobStatus
from imagebatch.errors import ImageBatchError, format_validation_error
from imagebatch.operator import builders, conditions, decide, metrics, observe, progress, scaling
from imagebatch.operator.conditions import Outcome, Reason
from imagebatch.operator.kube import EarlierIncarnationError, NotOwnedError, OperatorKube
from imagebatch.planning import expand_items
from imagebatch.prompts import load_prompts
from imagebatch.shardplan import shard_manifests
from imagebatch.timeutil import format_time, now_utc, parse_time

log = logging.getLogger(__name__)
JSON = dict[str, Any]


class PromptsNotReadyError(Exception):
    """The prompt ConfigMap does not exist (yet): wait, it may be applied after the job."""


@dataclass
class Settings:
    worker: builders.WorkerSettings = field(default_factory=builders.WorkerSettings)
    cool_down: float = scaling.DEFAULT_COOL_DOWN_SECONDS
    max_step: int = scaling.DEFAULT_MAX_STEP


@dataclass
class JobMemory(decide.Memory):
    lock: threading.Lock = field(default_factory=threading.Lock)
    # images/s from the items done seen at each pass (progress.RateMeter); empty after a restart.
    rate: progress.RateMeter = field(default_factory=progress.RateMeter)
    making: progress.MakingRate = field(default_factory=progress.MakingRate)


class Memories:
    """Per-job memory; handlers of one job (timer, create, update) run one at a time through its lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, JobMemory] = {}

    def of(self, uid: str) -> JobMemory:
        with self._lock:
            return self._jobs.setdefault(uid, JobMemory())

    def retain(self, uids: set[str]) -> None:
        """Forgets jobs that are gone."""
        with self._lock:
            for uid in set(self._jobs) - uids:
                del self._jobs[uid]


def plain(obj: Any) -> Any:
    """kopf's body views as plain dicts and lists."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


def previous_status(body: JSON) -> ImageBatchJobStatus:
    raw = body.get("status") or {}
    known = {f.alias or n for n, f in ImageBatchJobStatus.model_fields.items()}
    try:
        return ImageBatchJobStatus.model_validate({k: v for k, v in raw.items() if k in known})
    except ValidationError:
        return ImageBatchJobStatus()


class Reconciler:
    def __init__(self, kube: OperatorKube, settings: Settings | None = None) -> None:
        self.kube = kube
        self.settings = settings or Settings()
        self.memories = Memories()

    # -- entry point -------------------------------------------------------------------------------
    def reconcile(self, body: Mapping[str, Any]) -> None:
        job = plain(body)
        meta = job["metadata"]
        if meta.get("deletionTimestamp"):
            return
        mem = self.memories.of(meta["uid"])
        with mem.lock:
            try:
                self._reconcile(job, mem)
                metrics.RECONCILES.labels("ok").inc()
            except Exception:
                metrics.RECONCILES.labels("error").inc()
                raise
            finally:
                metrics.count_pass(meta["namespace"], meta["name"])

    def cannot_reconcile(self, body: Mapping[str, Any], error: BaseException) -> None:
        """Ends a job whose passes keep raising Failed, saying so (resync.py decides when). The
        message names the error's type only: its text may quote the job's own content."""
        job = plain(body)
        meta = job["metadata"]
        mem = self.memories.of(meta["uid"])
        with mem.lock:
            prev = previous_status(job)
            message = (
                f"the operator cannot process this job: its passes keep failing with {type(error).__name__}; "
                "it keeps serving every other job. Check the job's spec against `kubectl explain ibj.spec` "
                "and re-create it, or ask the cluster admin (the operator's log has the details)"
            )
            outcome = Outcome(failed_reason=Reason.CANNOT_RECONCILE, message=message)
            self._write_status(job, prev, prev.model_copy(), outcome, now_utc())

    # -- the pass --------------------------------------------------------------------------------
    def _reconcile(self, job: JSON, mem: JobMemory) -> None:
        """observe -> decide (pure: decide.py) -> apply -> write status (once)."""
        meta = job["metadata"]
        ns, name = meta["namespace"], meta["name"]
        now, mono = now_utc(), time.monotonic()
        prev = previous_status(job)

        if conditions.is_true(prev.conditions, conditions.COMPLETE) or conditions.is_true(
            prev.conditions, conditions.FAILED
        ):
            self._finished(job, prev, now)
            return

        try:
            spec = ImageBatchJobSpec.model_validate(job.get("spec") or {})
        except ValidationError as e:
            outcome = Outcome(failed_reason=Reason.INVALID_SPEC, message=format_validation_error(e, "spec"))
            self._write_status(job, prev, prev.model_copy(), outcome, now)
            return

        # -- observe (planning inline and ConfigMap prompts first: the decision needs the shards)
        uid = meta["uid"]
        shards = self.kube.list_shards(ns, name, uid)
        waiting: str | None = None
        operator_plans = spec.prompts_from is None or spec.prompts_from.config_map_key_ref is not None
        if operator_plans and not decide.planned(shards):
            # The informer may not have seen shards made a moment ago: ask the API before planning.
            shards = self.kube.list_shards(ns, name, uid, fresh=True)
        if operator_plans and not decide.planned(shards):
            try:
                shards = self._plan(job, spec)
            except PromptsNotReadyError as e:
                waiting = str(e)
            except (ImageBatchError, NotOwnedError) as e:
                # Prompts no retry can fix, or a shard name of this job taken by another's shard.
                reason = Reason.SHARD_NOT_OWNED if isinstance(e, NotOwnedError) else Reason.INVALID_PROMPTS
                self._write_status(
                    job, prev, prev.model_copy(), Outcome(failed_reason=reason, message=str(e)), now
                )
                return
        self._report_forged(job, mem)
        obs = observe.observe(self.kube, job, spec, prev, shards, now, mono, waiting)
        # A pass long after the last one (the API server was away) holds no silence against a worker.
        mem.clock.observe(shards, mono, gap=spec.retries.lease_seconds / 2)
        mem.clock.observe_pods(obs.pods)  # pods being stopped: their lost claims cost no attempt

        # -- decide
        d = decide.decide(obs, mem, decide.Settings(self.settings.cool_down, self.settings.max_step))

        # -- apply
        for tr in d.transitions:
            if self.kube.replace_shard_status(
                tr.shard, tr.status.model_dump(by_alias=True, exclude_none=True)
            ):
                metrics.RETRIES.labels(ns, tr.reason).inc()
                log.info(
                    "%s/%s: shard %s %s -> %s",
                    ns,
                    name,
                    tr.shard["metadata"]["name"],
                    tr.reason,
                    tr.status.state,
                )
        outcome = self._apply(job, spec, obs, d, mem)
        for ev in d.events:
            self.kube.post_event(job, ev.type, ev.reason, ev.message)
        mem.reported |= d.reported

        # -- status (the one write)
        # Right after a restart the meter has one sample: shard completions, or the average so far.
        average = d.tally.items.done / d.active_elapsed if d.active_elapsed >= 1 else 0.0
        fallback = max(
            progress.images_per_second(d.tally.completions, now, parse_time(prev.start_time) or now), average
        )
        meter = mem.rate.observe(mono, d.tally.items.done, fallback=fallback)
        rate = mem.making.observe(d.tally.claims, mono) or meter  # image making, no model load
        status = d.status
        status.images_per_second = f"{rate:.2f}"
        remaining = d.tally.items.total - d.tally.items.done - d.tally.items.failed
        status.eta = "" if outcome.finished else progress.eta(remaining, rate)
        if outcome is not d.outcome:
            status.state, status.reason = str(outcome.state), str(outcome.reason)
        self._write_status(job, prev, status, outcome, now)
        metrics.publish_job(ns, name, d.tally.items, rate, status.desired_replicas, status.active_replicas)

    # -- pieces ----------------------------------------------------------------------------------
    def _report_forged(self, job: JSON, mem: JobMemory) -> None:
        """One Warning Event per shard that carries this job's UID label but is not its shard by
        its other names (shardplan.forgery): it was ignored, never counted or adopted."""
        for name, why in sorted(self.kube.forged_shards(job["metadata"]["uid"]).items()):
            key = f"forged/{name}"
            if key not in mem.reported:
                self.kube.post_event(
                    job,
                    "Warning",
                    "ForgedShardIgnored",
                    f"ImageBatchShard {name} carries this job's UID label but {why}; it is not counted, "
                    "claimed or adopted (neither this job's operator nor its workers made it)",
                )
                mem.reported.add(key)

    def _plan(self, job: JSON, spec: ImageBatchJobSpec) -> list[JSON]:
        """Plans inline or ConfigMap prompts into shards (a prompt file is planned by a worker)."""
        meta = job["metadata"]

        def read_config_map(cm: str, key: str) -> str:
            value = self.kube.read_config_map_key(meta["namespace"], cm, key)
            if value is None:
                raise PromptsNotReadyError(
                    f"waiting for ConfigMap {cm} with key {key} (spec.promptsFrom.configMapKeyRef)"
                )
            return value

        items = expand_items(load_prompts(spec, config_map_reader=read_config_map), spec.generation)
        manifests = shard_manifests(job, len(items), spec.batching.shard_size)
        for m in manifests:
            self.kube.create_shard(m)
        self.kube.post_event(
            job, "Normal", "CreatedShards", f"planned {len(items)} images in {len(manifests)} shards"
        )
        return self.kube.list_shards(meta["namespace"], meta["name"], meta["uid"], fresh=True)

    def _apply(
        self, job: JSON, spec: ImageBatchJobSpec, obs: observe.Observed, d: decide.Decision, mem: JobMemory
    ) -> Outcome:
        """Carries out the decision's action on the worker Job; the outcome it ends with (making
        the worker RBAC can find a foreign object of that name: then the job fails)."""
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        a = d.action
        try:
            if a.kind == "delete" and obs.worker_job is not None:
                log.info("%s/%s: %s", ns, name, a.why)
                self.kube.delete_worker_job(ns, obs.worker_job["metadata"]["name"])
            elif a.kind == "create":
                # The pods' ServiceAccount and its rights first (again for each new worker Job: a
                # ConfigMap source may have changed, and someone may have deleted them).
                for obj in builders.worker_rbac(job, spec):
                    self.kube.ensure_owned(obj)
                wj = builders.worker_job(job, spec, a.parallelism, self.settings.worker)
                wj["metadata"].setdefault("annotations", {})[decide.ANNOTATION_ITEMS_AT_START] = str(
                    d.tally.items.done
                )
                self.kube.create(wj)
            elif a.kind == "patch" and obs.worker_job is not None:
                self.kube.patch_worker_job(ns, obs.worker_job["metadata"]["name"], {"spec": a.patch})
                if d.scaled_down:
                    mem.last_scale_down = time.monotonic()
        except EarlierIncarnationError as e:
            if not d.outcome.finished and not d.outcome.suspended:
                return Outcome(progress_reason=Reason.WAITING_FOR_EARLIER_INCARNATION, message=str(e))
        except NotOwnedError as e:
            # Someone else's ServiceAccount, Role or RoleBinding has the name of this job's: fail
            # the job rather than run its workers with (or grant) what that object holds.
            reason = Reason.WORKER_JOB_NOT_OWNED if e.kind == "Job" else Reason.WORKER_RBAC_NOT_OWNED
            return Outcome(failed_reason=reason, message=str(e))
        return d.outcome

    def _finished(self, job: JSON, prev: ImageBatchJobStatus, now: datetime) -> None:
        """A finished job keeps its outcome: no workers; deleted after ttlSecondsAfterFinished."""
        meta = job["metadata"]
        ns, name = meta["namespace"], meta["name"]
        wj, _ = observe.worker_job(self.kube, job)
        if wj is not None and not wj["metadata"].get("deletionTimestamp"):
            done = decide.job_condition(wj, "Complete") or decide.job_condition(wj, "Failed")
            if done is None and (job.get("spec") or {}).get("queueName"):
                # A parallelism change would make Kueue evict and queue it again: delete it instead.
                self.kube.delete_worker_job(ns, wj["metadata"]["name"])
            elif done is None and int(wj["spec"].get("parallelism") or 0) > 0:
                self.kube.patch_worker_job(ns, wj["metadata"]["name"], {"spec": {"parallelism": 0}})
        complete = conditions.is_true(prev.conditions, conditions.COMPLETE)
        live = len(decide.live_pods(self.kube.list_worker_pods(ns, name)))
        if live != prev.active_replicas:
            # Workers leave after the end: keep the Replicas column honest, nothing else changes.
            final = next(
                c
                for c in prev.conditions
                if c.type == (conditions.COMPLETE if complete else conditions.FAILED)
            )
            outcome = (
                Outcome(complete=True, message=final.message)
                if complete
                else Outcome(failed_reason=final.reason, message=final.message)
            )
            ready = f"{live}/0"  # leaving workers: none is wanted any more
            self._write_status(
                job, prev, prev.model_copy(update={"active_replicas": live, "ready": ready}), outcome, now
            )
        metrics.set_job_condition(ns, name, "Complete" if complete else "Failed")
        ttl = (job.get("spec") or {}).get("ttlSecondsAfterFinished")
        finished_at = parse_time(prev.completion_time)
        if ttl is not None and finished_at is not None and now >= finished_at + timedelta(seconds=int(ttl)):
            log.info("%s/%s: deleting, ttlSecondsAfterFinished=%s has passed", ns, name, ttl)
            self.kube.delete_job(ns, name)

    def _write_status(
        self,
        job: JSON,
        prev: ImageBatchJobStatus,
        status: ImageBatchJobStatus,
        outcome: Outcome,
        now: datetime,
    ) -> None:
        """The one place that writes an ImageBatchJob's status (and posts the condition Events)."""
        meta = job["metadata"]
        status.conditions = conditions.compute_conditions(
            prev.conditions, outcome, meta.get("generation"), format_time(now)
        )
        if outcome.finished and not status.completion_time:
            status.completion_time = format_time(now)
        if outcome.finished:
            status.desired_replicas = 0
            status.eta = ""
            status.running_since = None
        status.state, status.reason = str(outcome.state), str(outcome.reason)
        self._post_transition_events(job, prev.conditions, status.conditions)
        body = status.model_dump(by_alias=True, exclude_none=True)
        if body != prev.model_dump(by_alias=True, exclude_none=True):
            self.kube.patch_job_status(meta["namespace"], meta["name"], body)
        current = next(
            (
                c
                for c in (conditions.COMPLETE, conditions.FAILED, conditions.SUSPENDED)
                if conditions.is_true(status.conditions, c)
            ),
            conditions.RECONCILING,
        )
        metrics.set_job_condition(meta["namespace"], meta["name"], current)

    def _post_transition_events(self, job: JSON, before: list[Condition], after: list[Condition]) -> None:
        for c in after:
            was = conditions.is_true(before, c.type)
            now_true = c.status == "True"
            if now_true and not was:
                if c.type == conditions.COMPLETE:
                    self.kube.post_event(job, "Normal", "Completed", c.message)
                elif c.type == conditions.FAILED:
                    self.kube.post_event(job, "Warning", "Failed", f"{c.reason}: {c.message}")
                elif c.type == conditions.SUSPENDED:
                    self.kube.post_event(job, "Normal", "Suspended", "workers scaled to 0")
                elif c.type == conditions.QUEUED and c.reason == Reason.LOCAL_QUEUE_NOT_FOUND:
                    self.kube.post_event(job, "Warning", c.reason, c.message)
            elif was and not now_true and c.type == conditions.SUSPENDED:
                self.kube.post_event(job, "Normal", "Resumed", "spec.suspend is false again")
            elif c.type == conditions.WORKERS_HEALTHY and not now_true:
                old = conditions.find(before, c.type)
                if old is None or old.status == "True" or old.reason != c.reason:
                    self.kube.post_event(job, "Warning", c.reason, c.message)
