"""Shard planning: items → ImageBatchShard manifests. Pure; used by the operator and the worker.

A shard holds only an item range [start, end) of the job's planned items, never the prompts, so a
job with a million prompts in a file keeps etcd small. Whoever can read the prompt source plans:
the operator for inline prompts and ConfigMaps, the first worker for a prompt file (which only the
workers can read: it is on their volume or behind their storage credentials).
"""

from __future__ import annotations

from typing import Any

from imagebatch.api import SHARD_KIND, ImageBatchShardSpec, ImageBatchShardStatus, too_many_shards
from imagebatch.errors import ImageBatchError
from imagebatch.names import (
    ANNOTATION_ITEM_COUNT,
    ANNOTATION_SHARD_COUNT,
    API_VERSION,
    LABEL_COMPONENT,
    LABEL_JOB,
    LABEL_JOB_UID,
    shard_name,
)
from imagebatch.planning import plan_shards


def check_shard_count(n_items: int, shard_size: int) -> None:
    message = too_many_shards(n_items, shard_size)
    if message:
        raise ImageBatchError(message)


def owner_reference(job: dict[str, Any]) -> dict[str, Any]:
    """An owner reference to the ImageBatchJob, so that deleting it deletes the child.

    No blockOwnerDeletion: with the OwnerReferencesPermissionEnforcement admission plugin that
    would need update on imagebatchjobs/finalizers, which neither side is granted.
    """
    meta = job["metadata"]
    return {
        "apiVersion": job.get("apiVersion", API_VERSION),
        "kind": job.get("kind", "ImageBatchJob"),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }


def ownership(obj: dict[str, Any], job_name: str, uid: str) -> str:
    """Whose child `obj` is: "ours" (an owner reference to the job's UID), "earlier" (owned by an
    ImageBatchJob of the same name and another UID: an earlier incarnation, gone since the name is
    now this job's, so the garbage collector is deleting it), or "foreign" (anyone else's)."""
    owners = (obj.get("metadata") or {}).get("ownerReferences") or []
    if any(r.get("uid") == uid for r in owners):
        return "ours"
    if any(r.get("kind") == "ImageBatchJob" and r.get("name") == job_name for r in owners):
        return "earlier"
    return "foreign"


def annotation(shards: list[dict[str, Any]], key: str) -> int | None:
    """A plan-wide number every shard carries (the plan's shard or item count)."""
    for s in shards:
        value = (s["metadata"].get("annotations") or {}).get(key)
        if value is not None and str(value).isdigit():
            return int(value)
    return None


def shard_manifests(job: dict[str, Any], n_items: int, shard_size: int) -> list[dict[str, Any]]:
    """One ImageBatchShard per `shard_size` items, owned by the job, with the plan's size annotated."""
    meta = job["metadata"]
    check_shard_count(n_items, shard_size)
    ranges = plan_shards(n_items, shard_size)
    out: list[dict[str, Any]] = []
    for r in ranges:
        spec = ImageBatchShardSpec(job_name=meta["name"], index=r.index, start=r.start, end=r.end)
        out.append(
            {
                "apiVersion": API_VERSION,
                "kind": SHARD_KIND,
                "metadata": {
                    "name": shard_name(meta["name"], meta["uid"], r.index),
                    "namespace": meta["namespace"],
                    "labels": {LABEL_JOB: meta["name"], LABEL_JOB_UID: meta["uid"], LABEL_COMPONENT: "shard"},
                    "annotations": {
                        ANNOTATION_SHARD_COUNT: str(len(ranges)),
                        ANNOTATION_ITEM_COUNT: str(n_items),
                    },
                    "ownerReferences": [owner_reference(job)],
                },
                "spec": spec.model_dump(by_alias=True),
            }
        )
    return out


def plan_complete(shards: list[dict[str, Any]]) -> bool:
    """Every shard of the plan exists: there are some, and each carries the plan's shard count,
    which is how many there are. Until then the plan is being made (by the operator, or by the
    worker that plans a prompt file) and the job is neither planned nor done."""
    count = str(len(shards))
    return bool(shards) and all(
        (s["metadata"].get("annotations") or {}).get(ANNOTATION_SHARD_COUNT) == count for s in shards
    )


def shard_selector(job_name: str, uid: str) -> str:
    """The label selector of one incarnation's shards: the name alone would also match the shards
    of an earlier job of that name that are still being deleted."""
    return f"{LABEL_JOB}={job_name},{LABEL_JOB_UID}={uid}"


def forgery(shard: dict[str, Any], uid: str) -> str | None:
    """Why a shard that claims to be of the job with this UID is not (None: it is).

    A shard is a job's only when everything that names a job names this one: the job-uid label,
    the job label, exactly one owner reference (kind ImageBatchJob, this UID, the same name) and
    the name prefix the plan gives this job's shards. A worker token of another job may
    have made one that agrees in some of these only (a second owner, another job's UID label):
    counting it would let one job fail another.
    """
    meta = shard.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(LABEL_JOB_UID) != uid:
        return f"its {LABEL_JOB_UID} label is not {uid}"
    job = labels.get(LABEL_JOB)
    owners = meta.get("ownerReferences") or []
    if len(owners) != 1:
        return f"it has {len(owners)} owner references, not exactly one"
    owner = owners[0]
    if owner.get("kind") != "ImageBatchJob" or owner.get("uid") != uid or owner.get("name") != job:
        return f"its owner reference is not ImageBatchJob {job} with UID {uid}"
    prefix = shard_name(str(job), uid, 0)[: -len("00000")]
    if not str(meta.get("name", "")).startswith(prefix):
        return f"its name does not start with {prefix}, the plan's prefix for this job's shards"
    return None


def of_incarnation(shard: dict[str, Any], uid: str) -> bool:
    """True for a shard of the job with this UID, by every name it carries (see `forgery`). A
    shard made by hand or by someone else is never adopted."""
    return forgery(shard, uid) is None


def initial_status() -> dict[str, Any]:
    return ImageBatchShardStatus().model_dump(by_alias=True, exclude_none=True)
