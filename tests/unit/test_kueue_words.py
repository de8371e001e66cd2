"""What a job says while Kueue holds it: Kueue's own quota words from the Workload, and nothing
else a Workload's message may quote (issue 22)."""

from __future__ import annotations

from typing import Any

from imagebatch.api import ImageBatchJobSpec
from imagebatch.operator import lifecycle
from imagebatch.operator.observe import quantity, workload
from imagebatch.operator.observed import Observed
from imagebatch.reasons import Reason

JSON = dict[str, Any]
# Kueue v0.17's words (pkg/scheduler/flavorassigner/flavorassigner.go).
UNUSED = "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor default, 250m more needed"
OVER = (
    "couldn't assign flavors to pod set main: insufficient quota for cpu in flavor default, previously "
    "considered podsets requests (0) + current podset request (1) > maximum capacity (500m)"
)


def wl(message: str, count: int = 4, min_count: int | None = None) -> JSON:
    pod_set: JSON = {"name": "main", "count": count}
    if min_count is not None:
        pod_set["minCount"] = min_count
    reserved = {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": message}
    return {"spec": {"podSets": [pod_set]}, "status": {"conditions": [reserved]}}


def queued(observed_workload: Any, **fields: Any) -> Observed:
    raw = {
        "model": {"name": "builtin:tiny"},
        "prompts": ["a"],
        "output": {"uri": "/out"},
        "queueName": "team-a",
    }
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}, "spec": raw}
    from imagebatch.api import ImageBatchJobStatus

    obs = Observed(job=job, prev=ImageBatchJobStatus(), spec=ImageBatchJobSpec.model_validate(raw))
    obs.workload = observed_workload
    for k, v in fields.items():
        setattr(obs, k, v)
    return obs


def test_quantities_as_kueue_prints_them() -> None:
    assert quantity("500m") == quantity("0.5")
    assert quantity("2Gi") == 2 * 2**30 and quantity("1") == 1
    assert quantity("lots") is None and quantity("1Xi") is None


def test_missing_quota_is_said_in_kueues_words() -> None:
    o = lifecycle.queue_wait(queued(workload(wl(UNUSED))))
    assert o.progress_reason == Reason.QUEUED
    assert o.message == (
        "waiting for Kueue to admit the workers (LocalQueue team-a): "
        "insufficient unused quota for cpu in flavor default, 250m more needed"
    )


def test_workers_that_never_fit_name_the_capacity_and_the_fields_to_lower() -> None:
    o = lifecycle.queue_wait(queued(workload(wl(OVER))))
    assert o.progress_reason == Reason.NEVER_ADMITTABLE
    assert "maximum capacity (500m)" in o.message and "4 workers ask 1" in o.message
    assert "spec.workers.maxReplicas" in o.message and "spec.workers.resources" in o.message


def test_partial_admission_that_could_fit_is_only_queued() -> None:
    # 4 workers ask 1 cpu (250m each); Kueue may admit 1 (250m) of the 500m: it may fit later.
    may_fit = workload(wl(OVER, min_count=1))
    assert may_fit is not None and not may_fit.exceeds_capacity
    o = lifecycle.queue_wait(queued(may_fit))
    assert o.progress_reason == Reason.QUEUED
    assert o.message.endswith("Kueue may start 1 of the 4 (workers.minReplicas)")
    # minCount 3 asks 750m: never.
    never = workload(wl(OVER, min_count=3))
    assert never is not None and never.exceeds_capacity


def test_nothing_but_kueues_quota_words_reaches_the_job() -> None:
    """A Workload message may quote other things (validation errors, node selectors): dropped;
    names outside what Kubernetes allows for resources and flavors are not repeated either."""
    hostile = "; ".join(
        [
            "Could not obtain workload namespace: $(curl evil)",
            "insufficient unused quota for cpu in flavor <script>, 1 more needed",
            UNUSED.split(": ", 1)[1],
        ]
    )
    seen = workload(wl(hostile))
    assert seen is not None
    assert seen.quota == ("insufficient unused quota for cpu in flavor default, 250m more needed",)
    o = lifecycle.queue_wait(queued(seen))
    assert "curl" not in o.message and "<script>" not in o.message


def test_kueue_not_installed_names_the_field_to_remove() -> None:
    o = lifecycle.queue_wait(queued(None, kueue_installed=False))
    assert o.progress_reason == Reason.KUEUE_NOT_INSTALLED
    assert "Kueue is not installed" in o.message and "remove spec.queueName" in o.message
