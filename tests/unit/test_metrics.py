"""Per-job metric series go with the job: forget_job (DELETED event), retain_jobs (missed deletion)."""

from __future__ import annotations

from typing import Any, cast

import kopf
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from imagebatch.api import ItemCounts
from imagebatch.operator import handlers, metrics


def series_of(ns: str, job: str) -> set[str]:
    """Names of the samples in the process registry (what /metrics serves) labelled with the job."""
    return {
        s.name
        for family in REGISTRY.collect()
        for s in family.samples
        if s.labels.get("namespace") == ns and s.labels.get("job") == job
    }


def jobs_gauge(condition: str) -> float | None:
    return REGISTRY.get_sample_value("imagebatch_jobs", {"condition": condition})


def fill(ns: str, job: str, condition: str | None = "Reconciling") -> None:
    """What a reconcile pass leaves: every per-job series, and the job's condition (set only on a
    transition, so a job may have series and no condition yet)."""
    metrics.publish_job(ns, job, ItemCounts(total=10, done=4, failed=1), 2.5, 3, 2)
    metrics.count_pass(ns, job)
    if condition is not None:
        metrics.set_job_condition(ns, job, condition)


EVERY_PER_JOB = {
    "imagebatch_job_items",
    "imagebatch_job_images_per_second",
    "imagebatch_job_desired_replicas",
    "imagebatch_job_active_replicas",
    "imagebatch_job_reconciles_total",
    "imagebatch_job_reconciles_created",
}


def test_forget_job_removes_every_series_of_that_job_only() -> None:
    fill("ns-forget", "a", "Complete")
    fill("ns-forget", "b", "Complete")
    before = jobs_gauge("Complete")
    assert series_of("ns-forget", "a") == EVERY_PER_JOB
    assert (
        REGISTRY.get_sample_value(
            "imagebatch_job_items", {"namespace": "ns-forget", "job": "a", "state": "done"}
        )
        == 4
    )

    metrics.forget_job("ns-forget", "a")

    assert series_of("ns-forget", "a") == set()
    assert series_of("ns-forget", "b") == EVERY_PER_JOB
    assert jobs_gauge("Complete") == (before or 0) - 1
    metrics.forget_job("ns-forget", "a")  # a second DELETED event (or the resync after it): no error


def test_every_metric_with_a_job_label_is_forgotten() -> None:
    # A per-job metric added to metrics.py but not to PER_JOB would keep a deleted job's series.
    labelled = [
        m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase) and "job" in m._labelnames
    ]
    assert labelled
    assert set(map(id, labelled)) == set(map(id, metrics.PER_JOB))


def test_retain_jobs_forgets_a_job_deleted_while_the_operator_was_away() -> None:
    fill("ns-retain", "kept")
    fill("ns-retain", "gone", condition=None)
    metrics.retain_jobs({("ns-retain", "kept")} | {k for k in metrics._seen if k[0] != "ns-retain"})
    assert series_of("ns-retain", "gone") == set()
    assert series_of("ns-retain", "kept") == EVERY_PER_JOB


def test_the_deleted_event_handler_forgets_the_job() -> None:
    registry = kopf.OperatorRegistry()
    # register only closes over the reconciler and the resync; this test calls neither.
    handlers.register(cast(Any, None), cast(Any, None), registry)
    (handler,) = [h for h in registry._watching.get_all_handlers() if h.id == "forget-metrics-on-delete"]
    fill("ns-event", "j")
    handler.fn(type="MODIFIED", name="j", namespace="ns-event")
    assert series_of("ns-event", "j") == EVERY_PER_JOB
    handler.fn(type="DELETED", name="j", namespace="ns-event")
    assert series_of("ns-event", "j") == set()
