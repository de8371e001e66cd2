"""The manifest: one JSON line per image saying how it was made. Builders are pure."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from imagebatch.planning import Item
from imagebatch.storage import MANIFEST, Storage, manifest_part_key


@dataclass(frozen=True)
class ModelInfo:
    name: str
    revision: str | None
    pipeline: str
    scheduler: str
    dtype: str


@dataclass(frozen=True)
class BatchInfo:
    """What a batch of the engine reports for each of its items."""

    batch_size: int
    batch_seconds: float
    device: str
    oom_halvings: int = 0


def manifest_line(
    item: Item,
    key: str,
    model: ModelInfo,
    shard: str,
    worker: str,
    batch: BatchInfo | None,
    encode_seconds: float | None = None,
    truncated: bool = False,
    labels: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`batch` is None for an item whose image was already stored by an earlier, interrupted run.

    `truncated`: the prompt was longer than the text encoder reads. `labels`: fields of the
    process that made the image (rank and visible device of a multi-GPU worker pod)."""
    line: dict[str, Any] = {
        "id": item.id,
        "key": key,
        "prompt": item.prompt,
        "negative_prompt": item.negative_prompt,
        "seed": item.seed,
        "width": item.width,
        "height": item.height,
        "steps": item.steps,
        "guidance_scale": item.guidance_scale,
        "model": model.name,
        "revision": model.revision,
        "pipeline": model.pipeline,
        "scheduler": model.scheduler,
        "dtype": model.dtype,
        "shard": shard,
        "worker": worker,
    }
    if batch is None:
        line["resumed"] = True
    else:
        line.update(
            batch_size=batch.batch_size,
            device=batch.device,
            seconds_per_image=round(batch.batch_seconds / batch.batch_size, 6),
            encode_seconds=None if encode_seconds is None else round(encode_seconds, 6),
        )
        if batch.oom_halvings:
            line["oom_halvings"] = batch.oom_halvings
    if truncated:
        line["truncated"] = True
    if labels:
        line.update(labels)
    return line


def dumps_lines(lines: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


def write_part(storage: Storage, shard: str, lines: list[dict[str, Any]]) -> None:
    storage.write_bytes(manifest_part_key(shard), dumps_lines(lines))


def join_parts(storage: Storage, shards: Iterable[str]) -> bytes:
    """Concatenate the shards' parts, in shard order, into manifest.jsonl; returns what it wrote."""
    data = b"".join(storage.read_bytes(manifest_part_key(s)) for s in shards)
    storage.write_bytes(MANIFEST, data)
    return data
