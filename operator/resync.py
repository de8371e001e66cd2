"""The level-based heartbeat: every `interval` seconds, one reconcile pass of every ImageBatchJob.

Not a kopf timer: kopf puts a finalizer on every object that has a timer (to stop the timer
before the object goes), so deleting a job would wait for the operator, hang while it is down,
and with a timer next to other handlers we saw (as in nolar/kopf#1305) a deletion stay blocked.
A plain loop over a list needs no finalizer; kopf's create/update/resume handlers still make the
first pass after a change immediate.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from imagebatch.operator import metrics
from imagebatch.operator.kube import OperatorKube
from imagebatch.operator.reconcile import Reconciler

log = logging.getLogger(__name__)


class Resync(threading.Thread):
    def __init__(
        self,
        reconciler: Reconciler,
        kube: OperatorKube,
        namespaces: list[str],
        interval: float,
        workers: int = 4,
    ) -> None:
        super().__init__(name="resync", daemon=True)
        self.reconciler = reconciler
        self.kube = kube
        self.namespaces = namespaces
        self.interval = interval
        self.workers = workers
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="reconcile") as pool:
            while not self._stop.wait(self.interval):
                try:
                    jobs = self.kube.list_jobs(self.namespaces)
                except Exception as e:  # the API may be briefly away; the next tick tries again
                    log.warning("cannot list ImageBatchJobs: %s", e)
                    continue
                # One slow job must not hold up the others; a job's own passes never overlap
                # (the reconciler's per-job lock).
                list(pool.map(self._pass, jobs))
                self.reconciler.memories.retain({j["metadata"]["uid"] for j in jobs})
                metrics.retain_jobs({(j["metadata"]["namespace"], j["metadata"]["name"]) for j in jobs})

    def _pass(self, job: dict[str, object]) -> None:
        try:
            self.reconciler.reconcile(job)
        except Exception:
            meta = job.get("metadata") or {}
            assert isinstance(meta, dict)
            log.exception(
                "reconcile of %s/%s failed; retrying next tick", meta.get("namespace"), meta.get("name")
            )
