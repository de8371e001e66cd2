"""job.json: what made an output's images, and which later jobs may write into it (cluster mode).

Stored images are never remade, so a job may write into an output only if its images would be
the same: its fingerprint (settings and items, `fingerprint.fingerprint`) is the one recorded. The
one exception is a job that makes the output's failed items (`imagebatch retry-failed`): its items
differ, but every one of them is an item listed in the output's errors.jsonl with exactly the
settings recorded there (`manifest.item_digest`), and the settings of the whole job (model,
format, quality, layout) are the recorded ones. Such a job is recorded in job.json too, with
the number of its first shard: its manifest and errors parts follow the earlier jobs' parts, so
that nothing is overwritten and the join counts every item of the output once.

job.json keeps the fields local mode reads (`job`, `fingerprint`), so either mode can resume the
other's output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imagebatch.api import ImageBatchJobSpec
from imagebatch.errors import ImageBatchError
from imagebatch.fingerprint import fingerprint, image_fields
from imagebatch.manifest import ERRORS, item_digest, read_errors
from imagebatch.planning import Item
from imagebatch.storage import Storage

JOB_RECORD = "job.json"


@dataclass(frozen=True)
class Admission:
    """Where a job's parts go in its output, and how many items the whole output holds."""

    first_shard: int = 0  # the job's shard i writes the parts of shard first_shard + i
    items: int = 0  # the output's items (its first job's): what the join counts


def settings_digest(spec: ImageBatchJobSpec) -> str:
    """The settings of a whole job that decide its images beyond what each item carries."""
    fields = {k: v for k, v in image_fields(spec).items() if k != "generation"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def admit(
    storage: Storage, name: str, spec: ImageBatchJobSpec, items: Sequence[Item], shards: int
) -> Admission:
    """Records this job in the output's job.json, or raises an ImageBatchError if it may not
    write there. `shards`: how many shards the job has."""
    digest = fingerprint(image_fields(spec), items)
    settings = settings_digest(spec)
    if not storage.exists(JOB_RECORD):
        new: dict[str, Any] = {
            "job": name,
            "fingerprint": digest,
            "settings": settings,
            "items": len(items),
            "shards": shards,
        }
        storage.write_bytes(JOB_RECORD, json.dumps(new).encode())
        return Admission(0, len(items))
    record: dict[str, Any] = json.loads(storage.read_bytes(JOB_RECORD))
    total = int(record.get("items") or len(items))
    if record.get("fingerprint") == digest:
        return Admission(0, total)
    retries: list[dict[str, Any]] = list(record.get("retries") or [])
    for entry in retries:
        if entry.get("fingerprint") == digest:
            return Admission(int(entry["first_shard"]), total)
    why = _refusal(storage, record, settings, items)
    if why is not None:
        raise ImageBatchError(
            f"spec.output.uri: {storage.uri!r} holds images of job {record.get('job')!r} made with other "
            "settings (model, generation, format or prompts differ), and stored images are never remade; "
            f"point spec.output.uri at a new location, or delete the old output ({why})"
        )
    first = int(record.get("shards") or 0) + sum(int(e.get("shards") or 0) for e in retries)
    retries.append({"job": name, "fingerprint": digest, "first_shard": first, "shards": shards})
    storage.write_bytes(JOB_RECORD, json.dumps({**record, "retries": retries}).encode())
    return Admission(first, total)


def _refusal(storage: Storage, record: dict[str, Any], settings: str, items: Sequence[Item]) -> str | None:
    """Why this job may not make failed items of the output; None if it may."""
    if record.get("settings") != settings:
        return "not a retry of its failed items: the model, format, quality or layout differ"
    failed = {str(e.get("id")): e.get("item") for e in read_errors(storage, ERRORS)}
    for it in items:
        if it.id not in failed:
            return f"not a retry of its failed items: item {it.id} is not listed in {ERRORS}"
        if failed[it.id] != item_digest(it):
            return f"not a retry of its failed items: item {it.id} has other settings than in {ERRORS}"
    return None
