"""The observe step of a reconcile pass: everything the decision needs, read from the API once.

No decisions and no writes to the API. It also feeds the operator's memory what it saw (the
claim clock, the rate meters), and hands the decision what the last pass's actions met.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from imagebatch.api import ImageBatchJobSpec, ImageBatchJobStatus
from imagebatch.errors import ImageBatchError, format_validation_error
from imagebatch.names import ANNOTATION_ITEM_COUNT, worker_job_name
from imagebatch.operator import conditions, progress
from imagebatch.operator.decide import Memory, active_clock
from imagebatch.operator.kube import KueueNotInstalledError, OperatorKube
from imagebatch.operator.observed import Observed, Prompts, Refusal, Workload
from imagebatch.planning import expand_items
from imagebatch.prompts import load_prompts
from imagebatch.shardclient import EarlierIncarnationError, NotOwnedError, check_owned
from imagebatch.shardplan import annotation, plan_complete
from imagebatch.timeutil import now_utc, parse_time

JSON = dict[str, Any]


class _Lifecycle(BaseModel):
    """The spec fields a finished job still acts on, read even when the rest does not validate."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    queue_name: str | None = None
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)


def refusal(e: EarlierIncarnationError | NotOwnedError) -> Refusal:
    return Refusal("earlier" if isinstance(e, EarlierIncarnationError) else "foreign", e.kind, str(e))


def previous_status(body: JSON) -> ImageBatchJobStatus:
    raw = body.get("status") or {}
    known = {f.alias or n for n, f in ImageBatchJobStatus.model_fields.items()}
    try:
        return ImageBatchJobStatus.model_validate({k: v for k, v in raw.items() if k in known})
    except ValidationError:
        return ImageBatchJobStatus()


def worker_job(kube: OperatorKube, job: JSON) -> tuple[JSON | None, Refusal | None]:
    """This incarnation's worker Job; one of an earlier incarnation or of someone else is reported,
    not returned: neither its conditions nor its size are this job's."""
    meta = job["metadata"]
    wj = kube.get_worker_job(meta["namespace"], worker_job_name(meta["name"]))
    if wj is None:
        return None, None
    try:
        check_owned(wj, "Job", meta["namespace"], meta["name"], meta["uid"])
    except (EarlierIncarnationError, NotOwnedError) as e:
        return None, refusal(e)
    return wj, None


# Kueue's words for missing quota (pkg/scheduler/flavorassigner, v0.17): the only parts of a
# Workload's message the job repeats. Names as Kubernetes allows them for resources and flavors.
_NAME, _QTY = r"[A-Za-z0-9][A-Za-z0-9./_-]{0,252}", r"[0-9][0-9A-Za-z.+-]{0,63}"
_UNUSED = re.compile(
    rf"insufficient unused quota for (?P<r>{_NAME}) in flavor (?P<f>{_NAME}), (?P<q>{_QTY}) more needed"
)
_CAPACITY = re.compile(
    rf"insufficient quota for (?P<r>{_NAME}) in flavor (?P<f>{_NAME}), previously considered podsets "
    rf"requests \((?P<a>{_QTY})\) \+ current podset request \((?P<q>{_QTY})\) > maximum capacity "
    rf"\((?P<c>{_QTY})\)"
)


_SUFFIX = {"n": "1e-9", "u": "1e-6", "m": "1e-3", "": "1", "k": "1e3", "M": "1e6", "G": "1e9", "T": "1e12"}
_SUFFIX |= {"P": "1e15", "E": "1e18", "Ki": str(2**10), "Mi": str(2**20), "Gi": str(2**30)}
_SUFFIX |= {"Ti": str(2**40), "Pi": str(2**50), "Ei": str(2**60)}


def quantity(text: str) -> Decimal | None:
    """A Kubernetes quantity as Kueue prints it (500m, 1, 2Gi); None if it is not one."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    if m is None or m[2] not in _SUFFIX:
        return None
    try:
        return Decimal(m[1]) * Decimal(_SUFFIX[m[2]])
    except InvalidOperation:
        return None


def workload(wl: JSON | None) -> Workload | None:
    """What the decision reads of a Kueue Workload: admitted or not, and the quota it misses."""
    if wl is None:
        return None
    conds = {c.get("type"): c for c in (wl.get("status") or {}).get("conditions") or []}
    admitted = all((conds.get(t) or {}).get("status") == "True" for t in ("QuotaReserved", "Admitted"))
    reserved = conds.get("QuotaReserved") or {}
    text = str(reserved.get("message") or "") if reserved.get("status") == "False" else ""
    pod_sets = (wl.get("spec") or {}).get("podSets") or [{}]
    pods = int(pod_sets[0].get("count") or 0)
    min_count = pod_sets[0].get("minCount")
    least = pods if min_count is None else int(min_count)
    quota = [
        f"insufficient unused quota for {m['r']} in flavor {m['f']}, {m['q']} more needed"
        for m in _UNUSED.finditer(text)
    ]
    over, never = [], False
    for m in _CAPACITY.finditer(text):
        over.append(
            f"{m['r']} in flavor {m['f']}: {pods} workers ask {m['q']}, more than the ClusterQueue's "
            f"maximum capacity ({m['c']})"
        )
        # Kueue's figure is for the whole pod set; with partial admission it may admit `least`.
        asked, capacity = quantity(m["q"]), quantity(m["c"])
        if asked is not None and capacity is not None and pods > 0:
            never = never or asked * least / pods > capacity
    return Workload(
        admitted=admitted,
        quota=tuple(over + quota),
        exceeds_capacity=never,
        pods=pods,
        min_pods=None if min_count is None else int(min_count),
    )


def observe(
    kube: OperatorKube,
    job: JSON,
    mem: Memory,
    cannot_reconcile: str | None = None,
    now: datetime | None = None,
    mono: float | None = None,
) -> Observed:
    meta = job["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    raw_spec = job.get("spec") or {}
    try:
        life = _Lifecycle.model_validate(raw_spec)
    except ValidationError:
        life = _Lifecycle()
    obs = Observed(
        job=job,
        prev=previous_status(job),
        spec=None,
        queue_name=life.queue_name,
        ttl_seconds_after_finished=life.ttl_seconds_after_finished,
        clock=mem.clock,
        now=now or now_utc(),
        mono=time.monotonic() if mono is None else mono,
        cannot_reconcile=cannot_reconcile,
    )
    obs.refused, mem.refused = mem.refused, None
    if cannot_reconcile is not None:
        return obs  # the passes keep failing: read nothing more
    obs.finished = conditions.is_true(obs.prev.conditions, conditions.COMPLETE) or conditions.is_true(
        obs.prev.conditions, conditions.FAILED
    )
    if obs.finished:
        obs.worker_job, obs.not_ours = worker_job(kube, job)
        obs.pods = kube.list_worker_pods(ns, name)
        return obs
    try:
        obs.spec = spec = ImageBatchJobSpec.model_validate(raw_spec)
    except ValidationError as e:
        obs.invalid_spec = format_validation_error(e, "spec")
        return obs

    shards = kube.list_shards(ns, name, uid)
    operator_plans = spec.prompts_from is None or spec.prompts_from.config_map_key_ref is not None
    if operator_plans and not plan_complete(shards):
        # The informer may not have seen shards made a moment ago: ask the API before planning.
        shards = kube.list_shards(ns, name, uid, fresh=True)
    if operator_plans and not plan_complete(shards):
        obs.prompts = _read_prompts(kube, ns, spec)
    obs.shards = shards
    obs.forged = kube.forged_shards(uid)
    # Pods made before this job existed are an earlier incarnation's (a job deleted and created
    # again under its name), still ending: not this job's workers (RFC 3339 UTC sorts as text).
    # Listed after the shards: see leases.review.
    born = str(meta.get("creationTimestamp") or "")
    obs.pods = [
        p for p in kube.list_worker_pods(ns, name) if p["metadata"].get("creationTimestamp", born) >= born
    ]
    obs.worker_job, obs.not_ours = worker_job(kube, job)
    if spec.queue_name:
        try:
            obs.local_queue_found = kube.local_queue_exists(ns, spec.queue_name)
        except KueueNotInstalledError:
            obs.kueue_installed = False
        if obs.kueue_installed:
            uid = (obs.worker_job or {}).get("metadata", {}).get("uid")
            for wl in kube.worker_workloads(ns, worker_job_name(name)):
                owners = {r.get("uid") for r in wl["metadata"].get("ownerReferences") or []}
                if uid is not None and uid in owners:
                    obs.workload = workload(wl)
                else:
                    obs.earlier_workload = True

    # What the memory learns from this observation.
    # A pass long after the last one (the API server was away) holds no silence against a worker.
    mem.clock.observe(shards, obs.mono, gap=spec.retries.lease_seconds / 2)
    mem.clock.observe_pods(obs.pods)  # pods being stopped: their lost claims cost no attempt
    obs.images_per_second = _images_per_second(mem, obs, shards)
    return obs


def _read_prompts(kube: OperatorKube, ns: str, spec: ImageBatchJobSpec) -> Prompts:
    """Inline and ConfigMap prompts, read and expanded (the operator plans them; a worker plans a
    prompt file, which the operator may not be able to read)."""

    def read_config_map(cm: str, key: str) -> str:
        value = kube.read_config_map_key(ns, cm, key)
        if value is None:
            raise _NotReadyError(
                f"waiting for ConfigMap {cm} with key {key} (spec.promptsFrom.configMapKeyRef)"
            )
        return value

    try:
        items = expand_items(load_prompts(spec, config_map_reader=read_config_map), spec.generation)
    except _NotReadyError as e:
        return Prompts(waiting=str(e))
    except ImageBatchError as e:  # prompts no retry can fix; the message never quotes them
        return Prompts(error=str(e))
    return Prompts(items=len(items))


class _NotReadyError(Exception):
    """The prompt ConfigMap does not exist (yet): wait, it may be applied after the job."""


def _images_per_second(mem: Memory, obs: Observed, shards: list[JSON]) -> float:
    t = progress.tally(shards, annotation(shards, ANNOTATION_ITEM_COUNT) or 0)
    _, _, elapsed = active_clock(obs.prev, True, obs.now)
    # Right after a restart the meter has one sample: shard completions, or the average so far.
    average = t.items.done / elapsed if elapsed >= 1 else 0.0
    start = parse_time(obs.prev.start_time) or obs.now
    fallback = max(progress.images_per_second(t.completions, obs.now, start), average)
    meter = mem.rate.observe(obs.mono, t.items.done, fallback=fallback)
    return mem.making.observe(t.claims, obs.mono) or meter  # image making, no model load
