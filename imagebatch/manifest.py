"""The manifest: one JSON line per image saying how it was made. Builders are pure."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from imagebatch import contact_sheet
from imagebatch.planning import Item
from imagebatch.storage import HF_METADATA, MANIFEST, MANIFEST_PARQUET, Storage, manifest_part_key


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


def parameters_text(line: dict[str, Any]) -> str:
    """The AUTOMATIC1111 `parameters` string (what image tools show as the generation data): prompt, negative prompt, then `Key: value` settings."""
    settings = [
        ("Steps", line.get("steps")),
        ("Sampler", line.get("scheduler")),
        ("CFG scale", line.get("guidance_scale")),
        ("Seed", line.get("seed")),
        ("Size", f"{line.get('width')}x{line.get('height')}"),
        ("Model", line.get("model")),
        ("Model hash", line.get("revision")),
    ]
    text = str(line.get("prompt", ""))
    if line.get("negative_prompt"):
        text += f"\nNegative prompt: {line['negative_prompt']}"
    text += "\n" + ", ".join(f"{k}: {v}" for k, v in settings if v not in (None, ""))
    return text


def dumps_lines(lines: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


def write_part(storage: Storage, shard: str, lines: list[dict[str, Any]]) -> None:
    storage.write_bytes(manifest_part_key(shard), dumps_lines(lines))


def join_parts(storage: Storage, shards: Iterable[str]) -> bytes:
    """Concatenate the shards' parts, in shard order, into manifest.jsonl; returns what it wrote."""
    data = b"".join(storage.read_bytes(manifest_part_key(s)) for s in shards)
    storage.write_bytes(MANIFEST, data)
    return data


def parquet_bytes(lines: list[dict[str, Any]]) -> bytes:
    """manifest.parquet: the same rows and fields as manifest.jsonl (a field a line lacks is null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names: dict[str, None] = {}
    for line in lines:
        names.update(dict.fromkeys(line))
    table = pa.table({k: [line.get(k) for line in lines] for k in names})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def imagefolder_lines(lines: list[dict[str, Any]]) -> bytes:
    """metadata.jsonl for `datasets.load_dataset("imagefolder", data_dir=<output>)`."""
    keep = ("id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "model")
    rows = (
        {"file_name": line["key"]} | {k: line.get(k) for k in keep} | {"parameters": parameters_text(line)}
        for line in lines
    )
    return dumps_lines(rows)


def join_outputs(
    storage: Storage, title: str, shards: Iterable[str], layout: str, expected: int | None = None
) -> bytes:
    """Everything written once all shards are done: manifest.jsonl (returned), manifest.parquet,
    the imagefolder metadata (files layout) and the contact sheet's pages. With `expected`, a
    manifest of another line count raises before anything but manifest.jsonl is written."""
    data = join_parts(storage, shards)
    lines = contact_sheet.parse_manifest(data)
    if expected is not None and len(lines) != expected:
        raise RuntimeError(f"manifest has {len(lines)} lines for {expected} images")
    storage.write_bytes(MANIFEST_PARQUET, parquet_bytes(lines))
    if layout == "files":
        storage.write_bytes(HF_METADATA, imagefolder_lines(lines))
    pages = contact_sheet.render_pages(title, lines)
    # index.html last: its presence says every page it links to is there.
    for key, text in sorted(pages.items(), key=lambda kv: kv[0] == "index.html"):
        storage.write_bytes(key, text.encode())
    return data
