"""The observe step of a reconcile pass: everything the decision needs, read from the API once.

No decisions here and no writes (planning shards for inline and ConfigMap prompts happens before,
in reconcile.py, since the decision needs the shards it made).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from imagebatch.api import ImageBatchJobSpec, ImageBatchJobStatus
from imagebatch.names import worker_job_name
from imagebatch.operator.kube import EarlierIncarnationError, NotOwnedError, OperatorKube, check_owned

JSON = dict[str, Any]


@dataclass
class Observed:
    job: JSON
    spec: ImageBatchJobSpec
    prev: ImageBatchJobStatus
    shards: list[JSON]
    pods: list[JSON]  # listed after the shards (see leases.review)
    worker_job: JSON | None  # this incarnation's, or None
    not_ours: EarlierIncarnationError | NotOwnedError | None = None  # a worker Job we must not touch
    local_queue_found: bool | None = None  # spec.queueName's LocalQueue; None: not asked or unknown
    waiting_for_prompts: str | None = None  # the prompt ConfigMap is not there (yet)
    now: datetime = field(default_factory=datetime.now)
    mono: float = 0.0  # monotonic seconds: the operator's own clock for leases

    @property
    def meta(self) -> JSON:
        meta: JSON = self.job["metadata"]
        return meta


def worker_job(
    kube: OperatorKube, job: JSON
) -> tuple[JSON | None, EarlierIncarnationError | NotOwnedError | None]:
    """This incarnation's worker Job; one of an earlier incarnation or of someone else is reported,
    not returned: neither its conditions nor its size are this job's."""
    meta = job["metadata"]
    wj = kube.get_worker_job(meta["namespace"], worker_job_name(meta["name"]))
    if wj is None:
        return None, None
    try:
        check_owned(wj, "Job", meta["namespace"], meta["name"], meta["uid"])
    except (EarlierIncarnationError, NotOwnedError) as e:
        return None, e
    return wj, None


def observe(
    kube: OperatorKube,
    job: JSON,
    spec: ImageBatchJobSpec,
    prev: ImageBatchJobStatus,
    shards: list[JSON],
    now: datetime,
    mono: float,
    waiting_for_prompts: str | None = None,
) -> Observed:
    meta = job["metadata"]
    ns = meta["namespace"]
    # Pods made before this job existed are an earlier incarnation's (a job deleted and created
    # again under its name), still ending: not this job's workers (RFC 3339 UTC sorts as text).
    born = str(meta.get("creationTimestamp") or "")
    pods = [
        p
        for p in kube.list_worker_pods(ns, meta["name"])
        if p["metadata"].get("creationTimestamp", born) >= born
    ]
    wj, not_ours = worker_job(kube, job)
    found = kube.local_queue_exists(ns, spec.queue_name) if spec.queue_name else None
    return Observed(
        job=job,
        spec=spec,
        prev=prev,
        shards=shards,
        pods=pods,
        worker_job=wj,
        not_ours=not_ours,
        local_queue_found=found,
        waiting_for_prompts=waiting_for_prompts,
        now=now,
        mono=mono,
    )
