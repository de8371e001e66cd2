"""What one pass observed of a job: everything decide() needs, read from the API once. Types only.

observe.py fills it (it is the only decision-side module that talks to the API); decide.py and
its rooms (lifecycle.py, workers.py, status.py) read it and import nothing that talks to the API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from imagebatch.api import ImageBatchJobSpec, ImageBatchJobStatus
from imagebatch.operator.leases import ClaimClock

JSON = dict[str, Any]


@dataclass(frozen=True)
class Refusal:
    """An object of this job's name that the operator must not touch: an `earlier` incarnation's
    (being garbage-collected: wait) or someone else's (never adopt it: fail the job)."""

    whose: Literal["earlier", "foreign"]
    kind: str  # ImageBatchShard, Job, ServiceAccount, Role, RoleBinding
    message: str


@dataclass(frozen=True)
class Prompts:
    """The operator plans inline and ConfigMap prompts: what reading them gave, this pass."""

    items: int | None = None  # how many images they expand to
    waiting: str | None = None  # the prompt ConfigMap is not there (yet)
    error: str | None = None  # prompts no retry can fix


@dataclass(frozen=True)
class Workload:
    """The worker Job's Kueue Workload, as far as the decision reads it."""

    admitted: bool  # QuotaReserved and Admitted both True
    # What quota it misses, in Kueue's words (its QuotaReserved=False message), kept only where
    # they are Kueue's quota phrases, rebuilt from resource, flavor and quantity names:
    # nothing else a message may quote reaches the job's status.
    quota: tuple[str, ...] = ()
    # Even the fewest pods Kueue may admit ask more than the ClusterQueue can ever hold.
    exceeds_capacity: bool = False
    pods: int = 0  # the pod set's count
    min_pods: int | None = None  # its minCount: Kueue may admit this few (partial admission)


@dataclass
class Observed:
    job: JSON
    prev: ImageBatchJobStatus
    spec: ImageBatchJobSpec | None  # None: the spec does not validate (invalid_spec says why)
    invalid_spec: str | None = None
    finished: bool = False  # Complete or Failed already: the outcome stays
    cannot_reconcile: str | None = None  # passes kept raising this error type
    queue_name: str | None = None  # read apart from the spec, so a job with an invalid spec has them
    ttl_seconds_after_finished: int | None = None
    shards: list[JSON] = field(default_factory=list)
    prompts: Prompts | None = None  # set when the operator has prompts to plan
    forged: dict[str, str] = field(default_factory=dict)  # shard name -> why it is not this job's
    pods: list[JSON] = field(default_factory=list)  # listed after the shards (see leases.review)
    worker_job: JSON | None = None  # this incarnation's, or None
    not_ours: Refusal | None = None  # a worker Job of this name that is not this incarnation's
    refused: Refusal | None = None  # what the last pass's actions met (an observation now)
    local_queue_found: bool | None = None  # spec.queueName's LocalQueue; None: not asked or unknown
    kueue_installed: bool = True  # False: the API serves no LocalQueues (asked only with a queueName)
    workload: Workload | None = None  # the worker Job's Kueue Workload (with a queueName)
    # A Workload of an earlier worker Job of this name is still there: Kueue finds Workloads by
    # their owner's name and would give it to a new Job, then lose it to the garbage collector.
    earlier_workload: bool = False
    images_per_second: float = 0.0  # the rate meters' figure (they remember earlier passes)
    clock: ClaimClock = field(default_factory=ClaimClock)  # when each claim was last seen to move
    now: datetime = field(default_factory=datetime.now)
    mono: float = 0.0  # monotonic seconds: the operator's own clock for leases

    @property
    def meta(self) -> JSON:
        meta: JSON = self.job["metadata"]
        return meta
