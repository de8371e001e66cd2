"""Who runs a job's pass, and when: a per-job work queue (workqueue.py) and its workers.

Every trigger only queues the job: kopf's create/update/resume handlers, a shard of the job
changing (the informer), and the level-based heartbeat that queues every job each `interval`
seconds (it drives leases, scaling and status). `workers` threads take jobs from the queue, one
pass of one job at a time each, so a slow pass (a 20,000-shard plan, an API call that hangs)
holds one thread and its own job only: no tenant waits for another.

Not a kopf timer: kopf puts a finalizer on every object that has a timer (to stop the timer
before the object goes), so deleting a job would wait for the operator, hang while it is down,
and with a timer next to other handlers we saw (as in nolar/kopf#1305) a deletion stay blocked.

A pass that raises is tried again on the next trigger. One that keeps raising something other
than an API or network error (a job the operator cannot process: a bug meets this job's
content) ends that job Failed with reason CannotReconcile after `MAX_FAILED_PASSES`, instead of
failing for ever; the other jobs never notice either way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from imagebatch.operator import metrics
from imagebatch.operator.kube import OperatorKube
from imagebatch.operator.reconcile import Reconciler, plain
from imagebatch.operator.workqueue import WorkQueue

log = logging.getLogger(__name__)
JSON = dict[str, Any]

MAX_FAILED_PASSES = 3
# Errors of the API or the network: the next pass may well succeed, so they never fail a job.
TRANSIENT = (ApiException, urllib3.exceptions.HTTPError, OSError, TimeoutError)


class Resync:
    def __init__(
        self,
        reconciler: Reconciler,
        kube: OperatorKube,
        namespaces: list[str],
        interval: float,
        workers: int = 4,
    ) -> None:
        self.reconciler = reconciler
        self.kube = kube
        self.namespaces = namespaces
        self.interval = interval
        self.workers = workers
        self.queue: WorkQueue[str, JSON] = WorkQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failures: dict[str, int] = {}
        self._bodies: dict[str, JSON] = {}  # the newest body seen of each job, to queue it on a poke
        self._lock = threading.Lock()

    # -- triggers --------------------------------------------------------------------------------
    def enqueue(self, body: Mapping[str, Any]) -> None:
        """Queues a pass of this job (returns at once)."""
        job = plain(body)
        uid = (job.get("metadata") or {}).get("uid")
        if not uid:
            return
        with self._lock:
            self._bodies[uid] = job
        self.queue.add(uid, job)

    def poke(self, uid: str) -> None:
        """Queues a pass of the job with this UID, if it is known (a shard of it changed)."""
        with self._lock:
            job = self._bodies.get(uid)
        if job is not None:
            self.queue.add(uid, job)

    def forget(self, uid: str) -> None:
        with self._lock:
            self._bodies.pop(uid, None)
            self._failures.pop(uid, None)
        self.queue.forget(uid)

    # -- threads ---------------------------------------------------------------------------------
    def start(self) -> None:
        names = ["resync"] + [f"reconcile-{i}" for i in range(self.workers)]
        targets = [self._tick] + [self._work] * self.workers
        self._threads = [
            threading.Thread(target=t, name=n, daemon=True) for t, n in zip(targets, names, strict=True)
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()

    def _tick(self) -> None:
        """Every `interval` seconds: queue every job (the level-based heartbeat)."""
        while True:
            try:
                jobs = self.kube.list_jobs(self.namespaces)
            except Exception as e:  # the API may be briefly away; the next tick tries again
                log.warning("cannot list ImageBatchJobs: %s", e)
            else:
                uids = {j["metadata"]["uid"] for j in jobs}
                with self._lock:
                    gone = set(self._bodies) - uids
                for uid in gone:  # deleted while no DELETED event reached us (an outage)
                    self.forget(uid)
                for j in jobs:
                    self.enqueue(j)
                self.reconciler.memories.retain(uids)
                metrics.retain_jobs({(j["metadata"]["namespace"], j["metadata"]["name"]) for j in jobs})
            if self._stop.wait(self.interval):
                return

    def _work(self) -> None:
        while not self._stop.is_set():
            got = self.queue.get()
            if got is None:
                return
            uid, job = got
            try:
                self._pass(uid, job)
            finally:
                self.queue.done(uid)

    def _pass(self, uid: str, job: JSON) -> None:
        meta = job.get("metadata") or {}
        try:
            self.reconciler.reconcile(job)
        except TRANSIENT as e:
            log.warning(
                "pass of %s/%s failed (%s); retrying on the next trigger",
                meta.get("namespace"),
                meta.get("name"),
                e,
            )
            return
        except Exception as e:
            with self._lock:
                n = self._failures[uid] = self._failures.get(uid, 0) + 1
            log.exception("pass of %s/%s failed (%d in a row)", meta.get("namespace"), meta.get("name"), n)
            if n >= MAX_FAILED_PASSES:
                try:
                    self.reconciler.cannot_reconcile(job, e)
                except Exception:
                    log.exception("cannot mark %s/%s Failed", meta.get("namespace"), meta.get("name"))
            return
        with self._lock:
            self._failures.pop(uid, None)
