"""One reconcile pass of an ImageBatchJob: observe, decide, apply (the status written in one call).

Level-based: every pass starts from what the API says now, so a pass that is skipped, repeated or
run by a freshly restarted operator reaches the same result. The memory kept between passes
(decide.Memory) only damps and dedupes: losing it makes the next scale-down earlier, or an Event
posted twice.

    1. observe.py   read the job, its shards, pods, worker Job and queue (no writes)
    2. decide.py    a Plan: the complete new status and the actions (pure)
    3. apply        carry the actions out in order, then write the status if it changed

An action that meets an object it must not touch (someone else's, or an earlier incarnation's)
stops the plan there; the next pass, at once, observes why and decides from it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imagebatch.api import ImageBatchJobStatus
from imagebatch.names import worker_job_name
from imagebatch.operator import builders, decide, metrics, observe, workers
from imagebatch.operator.kube import OperatorKube
from imagebatch.operator.plan import (
    CreateShards,
    CreateWorkers,
    DeleteJob,
    DeleteWorkers,
    PatchWorkers,
    Plan,
    PostEvent,
    WriteShardStatus,
)
from imagebatch.operator.status import current_condition
from imagebatch.shardclient import EarlierIncarnationError, NotOwnedError

log = logging.getLogger(__name__)
JSON = dict[str, Any]

# Passes in one reconcile: planning makes the shards, the next pass starts their workers, and one
# more decides from what an action met.
MAX_PASSES = 3


@dataclass
class Settings:
    worker: builders.WorkerSettings = field(default_factory=builders.WorkerSettings)
    cool_down: float = workers.DEFAULT_COOL_DOWN_SECONDS
    max_step: int = workers.DEFAULT_MAX_STEP


@dataclass
class JobMemory(decide.Memory):
    lock: threading.Lock = field(default_factory=threading.Lock)


class Memories:
    """Per-job memory; passes of one job run one at a time through its lock."""

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


class Reconciler:
    def __init__(self, kube: OperatorKube, settings: Settings | None = None) -> None:
        self.kube = kube
        self.settings = settings or Settings()
        self.memories = Memories()

    def reconcile(self, body: Mapping[str, Any]) -> None:
        job = plain(body)
        meta = job["metadata"]
        if meta.get("deletionTimestamp"):
            return
        mem = self.memories.of(meta["uid"])
        with mem.lock:
            try:
                for _ in range(MAX_PASSES):
                    if not self._pass(job, mem):
                        break
                metrics.RECONCILES.labels("ok").inc()
            except Exception:
                metrics.RECONCILES.labels("error").inc()
                raise
            finally:
                metrics.count_pass(meta["namespace"], meta["name"])

    def cannot_reconcile(self, body: Mapping[str, Any], error: BaseException) -> None:
        """Ends a job whose passes keep raising Failed, saying so (resync.py decides when)."""
        job = plain(body)
        mem = self.memories.of(job["metadata"]["uid"])
        with mem.lock:
            self._pass(job, mem, cannot_reconcile=type(error).__name__)

    def _pass(self, job: JSON, mem: JobMemory, cannot_reconcile: str | None = None) -> bool:
        """One observe -> decide -> apply; True when the next pass should follow at once."""
        obs = observe.observe(self.kube, job, mem, cannot_reconcile)
        plan = decide.decide(obs, mem, decide.Settings(self.settings.cool_down, self.settings.max_step))
        if not self._apply(job, obs.prev, plan, mem):
            return True
        job["status"] = plan.status.model_dump(by_alias=True, exclude_none=True)
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        metrics.set_job_condition(ns, name, current_condition(plan.status))
        if plan.tally is not None:
            rate = float(plan.status.images_per_second or 0)
            s = plan.status
            metrics.publish_job(ns, name, plan.tally.items, rate, s.desired_replicas, s.active_replicas)
        return plan.again

    def _apply(self, job: JSON, prev: ImageBatchJobStatus, plan: Plan, mem: JobMemory) -> bool:
        """Carries out the plan's actions in order, then writes its status (the one status write).
        False when an action met an object it must not touch: the rest waits for the next pass."""
        meta = job["metadata"]
        ns, name = meta["namespace"], meta["name"]
        try:
            for a in plan.actions:
                match a:
                    case WriteShardStatus():
                        body = a.status.model_dump(by_alias=True, exclude_none=True)
                        if self.kube.replace_shard_status(a.shard, body):
                            metrics.RETRIES.labels(ns, a.reason).inc()
                            log.info(
                                "%s/%s: shard %s %s -> %s",
                                ns,
                                name,
                                a.shard["metadata"]["name"],
                                a.reason,
                                a.status.state,
                            )
                    case CreateShards():
                        for m in a.manifests:
                            self.kube.create_shard(m)
                    case CreateWorkers():
                        for obj in builders.worker_rbac(job, a.spec):
                            self.kube.ensure_owned(obj)
                        wj = builders.worker_job(job, a.spec, a.parallelism, self.settings.worker)
                        wj["metadata"].setdefault("annotations", {})[workers.ANNOTATION_ITEMS_AT_START] = str(
                            a.items_at_start
                        )
                        self.kube.create(wj)
                    case PatchWorkers():
                        self.kube.patch_worker_job(ns, worker_job_name(name), {"spec": a.patch})
                        if a.scaled_down:
                            mem.last_scale_down = time.monotonic()
                    case DeleteWorkers():
                        log.info("%s/%s: %s", ns, name, a.why)
                        self.kube.delete_worker_job(ns, worker_job_name(name))
                    case PostEvent():
                        self.kube.post_event(job, a.type, a.reason, a.message)
                    case DeleteJob():
                        log.info("%s/%s: deleting, %s", ns, name, a.why)
                        self.kube.delete_job(ns, name)
        except (EarlierIncarnationError, NotOwnedError) as e:
            mem.refused = observe.refusal(e)
            mem.reported |= plan.reported  # its Events come before any action that can be refused
            return False
        mem.reported |= plan.reported
        body = plan.status.model_dump(by_alias=True, exclude_none=True)
        if body != prev.model_dump(by_alias=True, exclude_none=True):
            self.kube.patch_job_status(ns, name, body)
        return True
