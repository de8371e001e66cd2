"""Prometheus metrics of the operator (served on --metrics-port).

Series labelled with a job (PER_JOB) go with the job: forget_job on its DELETED watch event
(handlers.py) and, for a deletion the operator did not see (it was down), retain_jobs after each
resync listing. The chart's dashboard (charts/imagebatch/dashboards/imagebatch.json) queries these
names; tests/unit/test_dashboard.py fails when one of them is renamed.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from imagebatch.api import ItemCounts
from imagebatch.reasons import ConditionType

JOBS = Gauge("imagebatch_jobs", "ImageBatchJobs by condition that is True", ["condition"])
ITEMS = Gauge("imagebatch_job_items", "Images of a job by state", ["namespace", "job", "state"])
RATE = Gauge("imagebatch_job_images_per_second", "Recent throughput of a job", ["namespace", "job"])
REPLICAS = Gauge("imagebatch_job_desired_replicas", "Worker pods wanted by a job", ["namespace", "job"])
ACTIVE_REPLICAS = Gauge(
    "imagebatch_job_active_replicas", "Worker pods of a job that are running", ["namespace", "job"]
)
RETRIES = Counter(
    "imagebatch_shard_retries_total",
    "Claims returned to Pending or failed by the operator",
    ["namespace", "reason"],
)
RECONCILES = Counter("imagebatch_reconciles_total", "Reconcile passes", ["result"])
# Per job: "has the operator looked at my job since X?" (on call, and the tests' way to wait for
# a pass instead of sleeping). Removed with the job.
JOB_PASSES = Counter(
    "imagebatch_job_reconciles_total", "Finished reconcile passes of a job", ["namespace", "job"]
)

# Every metric with a (namespace, job) label: forget_job removes their series.
PER_JOB: tuple[MetricWrapperBase, ...] = (ITEMS, RATE, REPLICAS, ACTIVE_REPLICAS, JOB_PASSES)

# Reconcile passes run in the resync pool and in kopf's handler threads at once.
_lock = threading.Lock()
# Jobs with series, so a job deleted while the operator was away is forgotten too.
_seen: set[tuple[str, str]] = set()
# The condition of each job seen, so the per-condition gauge counts every job once.
_job_conditions: dict[tuple[str, str], str] = {}


def count_pass(ns: str, name: str) -> None:
    with _lock:
        _seen.add((ns, name))
        JOB_PASSES.labels(ns, name).inc()


def publish_job(ns: str, name: str, items: ItemCounts, rate: float, desired: int, active: int) -> None:
    """The per-job gauges of one reconcile pass."""
    with _lock:
        _seen.add((ns, name))
        ITEMS.labels(ns, name, "done").set(items.done)
        ITEMS.labels(ns, name, "failed").set(items.failed)
        ITEMS.labels(ns, name, "total").set(items.total)
        RATE.labels(ns, name).set(rate)
        REPLICAS.labels(ns, name).set(desired)
        ACTIVE_REPLICAS.labels(ns, name).set(active)


def set_job_condition(ns: str, name: str, condition: str) -> None:
    with _lock:
        _job_conditions[(ns, name)] = condition
        _publish()


def forget_job(ns: str, name: str) -> None:
    """Removes every series of a deleted job and stops counting it in imagebatch_jobs."""
    with _lock:
        _forget((ns, name))
        _publish()


def retain_jobs(keys: set[tuple[str, str]]) -> None:
    """Forgets jobs that are gone (a deleted job is no longer counted)."""
    with _lock:
        for key in (_seen | set(_job_conditions)) - keys:
            _forget(key)
        _publish()


def _forget(key: tuple[str, str]) -> None:
    ns, name = key
    for metric in PER_JOB:
        metric.remove_by_labels({"namespace": ns, "job": name})
    _seen.discard(key)
    _job_conditions.pop(key, None)


def _publish() -> None:
    for cond in (
        ConditionType.COMPLETE,
        ConditionType.FAILED,
        ConditionType.SUSPENDED,
        ConditionType.RECONCILING,
    ):
        JOBS.labels(cond).set(sum(1 for c in _job_conditions.values() if c == cond))


def serve(port: int) -> None:
    if port:
        start_http_server(port)
