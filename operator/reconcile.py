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
from imagebatch.names import (
    ANNOTATION_ITEM_COUNT,
    ANNOTATION_MANIFEST_LINES,
    ANNOTATION_SHARD_COUNT,
    MODEL_LOAD_ERROR,
    worker_job_name,
)
from imagebatch.operator import builders, conditions, leases, metrics, progress, scaling
from imagebatch.operator.conditions import Outcome
from imagebatch.operator.kube import EarlierIncarnationError, NotOwnedError, OperatorKube, check_owned
from imagebatch.planning import expand_items
from imagebatch.prompts import load_prompts
from imagebatch.shardplan import shard_manifests
from imagebatch.storage import MANIFEST
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
class JobMemory:
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_scale_down: float | None = None


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


def _annotation(shards: list[JSON], key: str) -> int | None:
    for s in shards:
        value = (s["metadata"].get("annotations") or {}).get(key)
        if value is not None and str(value).isdigit():
            return int(value)
    return None


def _first_shard(shards: list[JSON]) -> JSON | None:
    return next((s for s in shards if int(s["spec"].get("index", -1)) == 0), None)


def _job_condition(job: JSON | None, type_: str) -> JSON | None:
    for c in ((job or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return dict(c)
    return None


def _live_pods(pods: list[JSON]) -> set[str]:
    # A pod being deleted still runs its worker until the grace period ends: it is live.
    return {
        p["metadata"]["name"]
        for p in pods
        if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    }


def _running(pods: list[JSON]) -> int:
    """Worker pods that started. Scaling below them would let the Job controller pick victims
    blindly among busy workers; idle ones exit by themselves. Pods not yet started can be cut."""
    return sum(
        1
        for p in pods
        if (p.get("status") or {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    )


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

    # -- the pass --------------------------------------------------------------------------------
    def _reconcile(self, job: JSON, mem: JobMemory) -> None:
        meta = job["metadata"]
        ns, name = meta["namespace"], meta["name"]
        now = now_utc()
        prev = previous_status(job)

        if conditions.is_true(prev.conditions, conditions.COMPLETE) or conditions.is_true(
            prev.conditions, conditions.FAILED
        ):
            self._finished(job, prev, now)
            return

        try:
            spec = ImageBatchJobSpec.model_validate(job.get("spec") or {})
        except ValidationError as e:
            outcome = Outcome(failed_reason="InvalidSpec", message=format_validation_error(e, "spec"))
            self._write_status(job, prev, prev.model_copy(), outcome, now)
            return

        uid = meta["uid"]
        shards = self.kube.list_shards(ns, name, uid)
        planning_error: str | None = None
        # Inline and ConfigMap prompts are planned here; a prompt file by the first worker.
        operator_plans = spec.prompts_from is None or spec.prompts_from.config_map_key_ref is not None
        if operator_plans and (not shards or _annotation(shards, ANNOTATION_SHARD_COUNT) != len(shards)):
            try:
                shards = self._plan(job, spec)
            except PromptsNotReadyError as e:
                planning_error = str(e)
            except ImageBatchError as e:
                outcome = Outcome(failed_reason="InvalidPrompts", message=str(e))
                self._write_status(job, prev, prev.model_copy(), outcome, now)
                return
            except NotOwnedError as e:
                # A shard name of this job is taken by a shard that is not this job's.
                outcome = Outcome(failed_reason="ShardNotOwned", message=str(e))
                self._write_status(job, prev, prev.model_copy(), outcome, now)
                return

        pods = self.kube.list_worker_pods(ns, name)
        live = _live_pods(pods)
        requeued = 0
        for tr in leases.review(shards, live, now, spec.retries.lease_seconds, spec.retries.max_attempts):
            if self.kube.replace_shard_status(
                tr.shard, tr.status.model_dump(by_alias=True, exclude_none=True)
            ):
                requeued += 1
                metrics.RETRIES.labels(ns, tr.reason).inc()
                log.info(
                    "%s/%s: shard %s %s -> %s",
                    ns,
                    name,
                    tr.shard["metadata"]["name"],
                    tr.reason,
                    tr.status.state,
                )
                self.kube.post_event(
                    job, "Warning", tr.reason, f"shard {tr.shard['metadata']['name']}: {tr.status.error}"
                )
        if requeued:
            shards = self.kube.list_shards(ns, name, uid)

        shard_count = _annotation(shards, ANNOTATION_SHARD_COUNT)
        planned = bool(shards) and shard_count == len(shards)
        total = _annotation(shards, ANNOTATION_ITEM_COUNT) or 0
        t = progress.tally(shards, total)
        first = _first_shard(shards)
        joined = first is not None and ANNOTATION_MANIFEST_LINES in (
            first["metadata"].get("annotations") or {}
        )
        all_done = planned and t.shards.done == t.shards.total
        wj_name = worker_job_name(name)
        wj = self.kube.get_worker_job(ns, wj_name)
        not_ours: EarlierIncarnationError | NotOwnedError | None = None
        if wj is not None:
            try:
                check_owned(wj, "Job", ns, name, uid)
            except (EarlierIncarnationError, NotOwnedError) as e:
                # Neither its conditions nor its size are this job's.
                not_ours, wj = e, None
        started = parse_time(prev.start_time) or now

        outcome = self._outcome(spec, t, planned, all_done, joined, wj, started, now, planning_error)

        # -- replicas ------------------------------------------------------------------------------
        if not planned:
            claimable = 0 if planning_error else 1  # one worker plans the prompt file
        elif all_done and not joined:
            claimable = 1  # one worker joins the manifest
        else:
            claimable = t.shards.pending
        current = int(((wj or {}).get("spec") or {}).get("parallelism") or 0)
        decision = scaling.desired_replicas(
            claimable,
            spec.workers.shards_per_replica,
            spec.workers.min_replicas,
            spec.workers.max_replicas,
            current,
            mem.last_scale_down,
            time.monotonic(),
            done=outcome.finished,
            suspended=spec.suspend,
            busy=max(len(t.holders), _running(pods)),
            cool_down=self.settings.cool_down,
            max_step=self.settings.max_step,
        )
        desired = decision.replicas
        try:
            if not_ours is not None:
                raise not_ours
            self._apply_worker_job(job, spec, wj, desired, current, outcome, mem, decision.scaled_down)
        except EarlierIncarnationError as e:
            # The job was deleted and re-created while the garbage collector deletes the old one's
            # worker Job or RBAC: run no workers until it is gone (a later pass creates them).
            if not outcome.finished and not outcome.suspended:
                outcome = Outcome(progress_reason="WaitingForEarlierIncarnation", message=str(e))
        except NotOwnedError as e:
            # Someone else's worker Job, ServiceAccount, Role or RoleBinding has the name of this
            # job's: fail the job rather than run its workers with (or grant) what that object holds.
            reason = "WorkerJobNotOwned" if e.kind == "Job" else "WorkerRBACNotOwned"
            outcome = Outcome(failed_reason=reason, message=str(e))
            desired = 0

        # -- status --------------------------------------------------------------------------------
        rate = progress.images_per_second(t.completions, now, started)
        status = prev.model_copy(
            update={
                "observed_generation": meta.get("generation"),
                "items": t.items,
                "shards": t.shards,
                "progress": progress.progress_text(t.items),
                "desired_replicas": desired,
                "active_replicas": len(live),
                "images_per_second": f"{rate:.2f}",
                "eta": ""
                if outcome.finished
                else progress.eta(t.items.total - t.items.done - t.items.failed, rate),
                "start_time": prev.start_time or format_time(now),
            }
        )
        if outcome.finished and not status.completion_time:
            status.completion_time = format_time(now)
        if outcome.complete:
            status.manifest = f"{spec.output.uri.rstrip('/')}/{MANIFEST}"
        self._write_status(job, prev, status, outcome, now)
        metrics.ITEMS.labels(ns, name, "done").set(t.items.done)
        metrics.ITEMS.labels(ns, name, "failed").set(t.items.failed)
        metrics.ITEMS.labels(ns, name, "total").set(t.items.total)
        metrics.RATE.labels(ns, name).set(rate)
        metrics.REPLICAS.labels(ns, name).set(desired)

    # -- pieces ----------------------------------------------------------------------------------
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
        return self.kube.list_shards(meta["namespace"], meta["name"], meta["uid"])

    def _outcome(
        self,
        spec: ImageBatchJobSpec,
        t: progress.Tally,
        planned: bool,
        all_done: bool,
        joined: bool,
        wj: JSON | None,
        started: datetime,
        now: datetime,
        planning_error: str | None,
    ) -> Outcome:
        if t.shards.failed:
            model_errors = [e for e in t.errors if f": {MODEL_LOAD_ERROR}" in e]
            if model_errors:
                msg = model_errors[0].split(f": {MODEL_LOAD_ERROR}: ", 1)[-1]
                return Outcome(failed_reason=MODEL_LOAD_ERROR, message=msg)
            return Outcome(
                failed_reason="ShardsFailed",
                message=(
                    f"{t.shards.failed} of {t.shards.total} shards ({t.items.failed} images) failed after "
                    f"{spec.retries.max_attempts} attempts; first error: {t.errors[0]}"
                ),
            )
        if all_done and joined:
            return Outcome(
                complete=True,
                message=f"{t.items.done} images; manifest at {spec.output.uri.rstrip('/')}/{MANIFEST}",
            )
        if spec.active_deadline_seconds and now - started > timedelta(seconds=spec.active_deadline_seconds):
            return Outcome(
                failed_reason="DeadlineExceeded",
                message=f"not complete after spec.activeDeadlineSeconds={spec.active_deadline_seconds}s ({t.items.done}/{t.items.total} images)",
            )
        failed_job = _job_condition(wj, "Failed")
        if failed_job is not None and not planned:
            return Outcome(
                failed_reason="PlanningFailed",
                message=(
                    f"the worker could not read or plan the prompts ({failed_job.get('reason')}: "
                    f"{failed_job.get('message')}); see the logs of the pods of Job {(wj or {})['metadata']['name']}"
                ),
            )
        if spec.suspend:
            return Outcome(suspended=True)
        if planning_error:
            return Outcome(progress_reason="PromptsNotReadyError", message=planning_error)
        if not planned:
            return Outcome(
                progress_reason="Planning", message="a worker is reading the prompt file and planning shards"
            )
        if all_done:
            return Outcome(progress_reason="Joining", message="joining the manifest parts")
        return Outcome(progress_reason="Running", message=f"{t.items.done}/{t.items.total} images")

    def _apply_worker_job(
        self,
        job: JSON,
        spec: ImageBatchJobSpec,
        wj: JSON | None,
        desired: int,
        current: int,
        outcome: Outcome,
        mem: JobMemory,
        scaled_down: bool,
    ) -> None:
        ns = job["metadata"]["namespace"]
        if wj is not None and wj["metadata"].get("deletionTimestamp"):
            return  # being replaced: create the new one on a later pass
        finished_job = _job_condition(wj, "Complete") or _job_condition(wj, "Failed")
        if wj is not None and finished_job is not None:
            # A finished Job creates no pods; when work is left (a shard came back after its
            # workers exited, or crashes used up backoffLimit) a new one takes over.
            if desired > 0 and not outcome.finished:
                log.info(
                    "%s/%s: worker Job finished with work left; replacing it", ns, job["metadata"]["name"]
                )
                self.kube.delete_worker_job(ns, wj["metadata"]["name"])
            return
        if wj is None:
            if desired > 0:
                # The pods' ServiceAccount and its rights first (again for each new worker Job:
                # a ConfigMap source may have changed, and someone may have deleted them).
                for obj in builders.worker_rbac(job, spec):
                    self.kube.ensure_owned(obj)
                self.kube.create(builders.worker_job(job, spec, desired, self.settings.worker))
                self.kube.post_event(job, "Normal", "ScaledUp", f"started worker Job with {desired} workers")
            return
        patch: JSON = {}
        if desired != current:
            patch["parallelism"] = desired
        if not spec.queue_name and bool(wj["spec"].get("suspend")) != spec.suspend:
            # With Kueue, suspend belongs to Kueue; a suspended ImageBatchJob runs 0 workers instead.
            patch["suspend"] = spec.suspend
        if not patch:
            return
        self.kube.patch_worker_job(ns, wj["metadata"]["name"], {"spec": patch})
        if desired > current:
            self.kube.post_event(job, "Normal", "ScaledUp", f"workers {current} -> {desired}")
        elif desired < current:
            self.kube.post_event(job, "Normal", "ScaledDown", f"workers {current} -> {desired}")
            if scaled_down:
                mem.last_scale_down = time.monotonic()

    def _finished(self, job: JSON, prev: ImageBatchJobStatus, now: datetime) -> None:
        """A finished job keeps its outcome: no workers; deleted after ttlSecondsAfterFinished."""
        meta = job["metadata"]
        ns, name = meta["namespace"], meta["name"]
        wj = self.kube.get_worker_job(ns, worker_job_name(name))
        if wj is not None and not wj["metadata"].get("deletionTimestamp"):
            done = _job_condition(wj, "Complete") or _job_condition(wj, "Failed")
            if done is None and int(wj["spec"].get("parallelism") or 0) > 0:
                self.kube.patch_worker_job(ns, wj["metadata"]["name"], {"spec": {"parallelism": 0}})
        complete = conditions.is_true(prev.conditions, conditions.COMPLETE)
        live = len(_live_pods(self.kube.list_worker_pods(ns, name)))
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
            self._write_status(job, prev, prev.model_copy(update={"active_replicas": live}), outcome, now)
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
            elif was and not now_true and c.type == conditions.SUSPENDED:
                self.kube.post_event(job, "Normal", "Resumed", "spec.suspend is false again")
