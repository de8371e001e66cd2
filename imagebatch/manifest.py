"""The manifest: one JSON line per image saying how it was made. Builders are pure.

Items the engine could not make are not in it: each shard lists them in `errors/<shard>.jsonl`
(id, shard, error type and message, worker, and a digest of the item's settings), and the join
writes `errors.jsonl` beside manifest.jsonl and adds them to manifest.parquet as rows whose
`error` column is set. A later job that makes them (`imagebatch retry-failed`) writes its own
parts into the same output; the join then counts an item made by any part as made.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from imagebatch import contact_sheet
from imagebatch.layouts import OutputLayout, layout_for
from imagebatch.names import ERRORS as ERRORS  # noqa: PLC0414 (named by the status too)
from imagebatch.planning import Item
from imagebatch.storage import MANIFEST, MANIFEST_PARQUET, Storage, manifest_part_key

ERROR_PARTS = "errors"


def error_part_key(shard: str) -> str:
    return f"{ERROR_PARTS}/{shard}.jsonl"


def item_digest(item: Item) -> str:
    """A digest of everything that decides an item's image: a job that retries the item must
    give it exactly these settings (its prompt is not in errors.jsonl, only this)."""
    return hashlib.sha256(json.dumps(item.to_dict(), sort_keys=True).encode()).hexdigest()[:32]


def error_line(item: Item, shard: str, worker: str, error_type: str, message: str) -> dict[str, Any]:
    """The errors.jsonl line of an item that could not be made. `message` must quote no prompt."""
    return {
        "id": item.id,
        "shard": shard,
        "error": error_type,
        "message": message,
        "worker": worker,
        "item": item_digest(item),
    }


def write_errors_part(storage: Storage, shard: str, lines: list[dict[str, Any]]) -> None:
    storage.write_bytes(error_part_key(shard), dumps_lines(lines))


def read_errors(storage: Storage, key: str = ERRORS) -> list[dict[str, Any]]:
    """The lines of errors.jsonl (or of one part); none when there is no such file."""
    if not storage.exists(key):
        return []
    return [json.loads(x) for x in storage.read_bytes(key).decode().splitlines() if x.strip()]


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


_IMAGEFOLDER_FIELDS = (
    "id",
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "model",
)
# Parquet rows are gathered (as Arrow columns, not Python objects) into row groups of about this many.
ROW_GROUP_ROWS = 65536


def imagefolder_line(line: dict[str, Any]) -> dict[str, Any]:
    """A metadata.jsonl row for `datasets.load_dataset("imagefolder", data_dir=<output>)`."""
    return (
        {"file_name": line["key"]}
        | {k: line.get(k) for k in _IMAGEFOLDER_FIELDS}
        | {"parameters": parameters_text(line)}
    )


def _part(storage: Storage, shard: str) -> tuple[bytes, list[dict[str, Any]]]:
    data = storage.read_bytes(manifest_part_key(shard))
    return data, contact_sheet.parse_manifest(data)


def _columns(lines: list[dict[str, Any]], names: dict[str, None]) -> dict[str, list[Any]]:
    return {k: [line.get(k) for line in lines] for k in names}


def join_outputs(
    storage: Storage,
    title: str,
    shards: Iterable[str],
    layout: str | OutputLayout,
    expected: int | None = None,
) -> int:
    """Everything written once all shards are done: manifest.jsonl, manifest.parquet, the
    layout's files (`OutputLayout.join_files`: the imagefolder metadata of the files layout) and
    the contact sheet's pages; returns the line count.

    Part by part, in two passes, so that the whole manifest is never in memory (a million lines
    are a few GB as Python objects): the first concatenates the parts into manifest.jsonl and
    learns the line count and the Parquet schema (every field any line has, types unified), the
    second writes the rest. With `expected` (the job's items), a manifest whose lines and failed
    items do not add up to it raises before anything but manifest.jsonl is written. The failed
    items (errors parts, less those that another part made) go to errors.jsonl and, with an
    `error` column, to manifest.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = list(shards)
    count = 0
    names: dict[str, None] = {}  # every field, in the order lines first have it
    schemas: list[pa.Schema] = []
    # The failed items (few, by design): those a part of a later job made are not failed any more.
    errors: dict[str, dict[str, Any]] = {}
    found = storage.existing(error_part_key(s) for s in shards)
    for shard in shards:
        if error_part_key(shard) in found:
            errors.update((e["id"], e) for e in read_errors(storage, error_part_key(shard)))
    with storage.open_write(MANIFEST) as out:
        for shard in shards:
            data, lines = _part(storage, shard)
            out.write(data)
            count += len(lines)
            for line in lines:
                names.update(dict.fromkeys(line))
                errors.pop(line["id"], None)
            if lines:
                schemas.append(
                    pa.table(_columns(lines, dict.fromkeys(k for line in lines for k in line))).schema
                )
    if expected is not None and count + len(errors) != expected:
        failed_text = f" and {len(errors)} failed items" if errors else ""
        raise RuntimeError(f"manifest has {count} lines{failed_text} for {expected} images")
    failed = list(errors.values())
    if failed or storage.exists(ERRORS):
        storage.write_bytes(ERRORS, dumps_lines(failed))  # (emptied once a later job made them all)
    if failed:
        names.update(dict.fromkeys(("id", "shard", "error")))
        schemas.append(
            pa.schema(
                [pa.field("id", pa.string()), pa.field("shard", pa.string()), pa.field("error", pa.string())]
            )
        )
    unified = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    schema = pa.schema(
        [pa.field(k, unified.field(k).type if k in unified.names else pa.null()) for k in names]
    )

    sheet = contact_sheet.SheetWriter(title, count)
    with contextlib.ExitStack() as files:
        writer = files.enter_context(
            pq.ParquetWriter(files.enter_context(storage.open_write(MANIFEST_PARQUET)), schema)
        )
        extra = [
            (f.row, files.enter_context(storage.open_write(f.key))) for f in layout_for(layout).join_files()
        ]
        pending: list[pa.Table] = []
        for shard in shards:
            _, lines = _part(storage, shard)
            cols = _columns(lines, names)
            pending.append(pa.table({k: pa.array(cols[k], type=schema.field(k).type) for k in names}))
            if sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending))
                pending = []
            for row, out in extra:
                out.write(dumps_lines(row(line) for line in lines))
            for line in lines:
                for key, text in sheet.add(line):
                    storage.write_bytes(key, text.encode())
        if failed:
            rows = [
                {"id": e["id"], "shard": e["shard"], "error": f"{e['error']}: {e['message']}"} for e in failed
            ]
            cols = _columns(rows, names)
            pending.append(pa.table({k: pa.array(cols[k], type=schema.field(k).type) for k in names}))
        if pending:
            writer.write_table(pa.concat_tables(pending))
    # index.html last: its presence says every page it links to is there.
    for key, text in sheet.finish():
        storage.write_bytes(key, text.encode())
    return count
