"""Processing one shard: the engine makes its missing images, then its manifest part is written.

Shared by local mode and cluster mode, so both write the same keys and the same lines. With
output.layout webdataset, the shard's images and their JSON go into one tar, written in one go
(one PUT on object storage instead of one per image) before the part. Items the engine could not
make (worker/itemfail.py) have no image and no manifest line: they are listed in the shard's
errors part, written before its manifest part.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from imagebatch.errors import SpecError
from imagebatch.manifest import ModelInfo, error_line, manifest_line, write_errors_part, write_part
from imagebatch.planning import Item
from imagebatch.storage import EXTENSIONS, MemorySink, build_tar, image_key, read_tar, shard_tar_key
from imagebatch.worker.engine import Engine, ItemResult
from imagebatch.worker.pipeline import LoadedPipeline


def model_info(loaded: LoadedPipeline) -> ModelInfo:
    return ModelInfo(
        name=loaded.model,
        revision=loaded.revision,
        pipeline=loaded.pipeline_class,
        scheduler=loaded.scheduler_class,
        dtype=str(loaded.dtype).removeprefix("torch."),
    )


def process_shard(
    engine: Engine,
    shard: str,
    items: Sequence[Item],
    on_done: Callable[[ItemResult], None] | None = None,
    layout: str = "files",
) -> list[dict[str, Any]]:
    """Make the shard's images (skipping stored ones) and write its manifest part; return its lines."""
    info = model_info(engine.loaded)
    worker = engine.opts.worker

    def metadata(it: Item) -> dict[str, Any]:
        # What the image file says about itself: how it was made, not how fast.
        key = shard_tar_key(shard) if layout == "webdataset" else image_key(it.id, engine.opts.image_format)
        line = manifest_line(it, key, info, shard, worker, None)
        line.pop("resumed")
        return {k: v for k, v in line.items() if v is not None}

    if layout == "webdataset":
        results, lines = _webdataset_shard(engine, shard, items, on_done, info, metadata)
    else:
        results = engine.run(items, on_done, metadata=metadata)
        lines = [result_line(engine, r, r.key, info, shard) for r in results if r.error is None]
    errors = [
        error_line(r.item, shard, worker, r.error.type, r.error.message)
        for r in results
        if r.error is not None
    ]
    if errors:
        write_errors_part(engine.storage, shard, errors)
    # The part is written last: its presence means every image of the shard is stored (or listed
    # as failed in the errors part).
    write_part(engine.storage, shard, lines)
    return lines


def result_line(engine: Engine, r: ItemResult, key: str, info: ModelInfo, shard: str) -> dict[str, Any]:
    """The manifest line of one made (or already stored) image, stored under `key`."""
    return manifest_line(
        r.item,
        key,
        info,
        shard,
        engine.opts.worker,
        r.batch,
        r.encode_seconds,
        truncated=r.truncated,
        labels=engine.opts.labels,
    )


def _webdataset_shard(
    engine: Engine,
    shard: str,
    items: Sequence[Item],
    on_done: Callable[[ItemResult], None] | None,
    info: ModelInfo,
    metadata: Callable[[Item], dict[str, Any]],
) -> tuple[list[ItemResult], list[dict[str, Any]]]:
    ext = EXTENSIONS[engine.opts.image_format]
    for it in items:
        if "." in it.id:
            # webdataset readers split a member name at its first dot: `a.b.png` would be key `a`.
            raise SpecError(
                f"item id {it.id!r} holds a '.', which webdataset readers take as the start of the "
                "file extension; use ids without dots with spec.output.layout webdataset"
            )
    tar_key = shard_tar_key(shard)
    # Resumable per shard: a tar already written (the part was not, yet) gives back its images.
    stored = read_tar(engine.storage.read_bytes(tar_key)) if engine.storage.exists(tar_key) else {}
    fmt = engine.opts.image_format
    sink = MemorySink(
        {image_key(n.removesuffix(f".{ext}"), fmt): b for n, b in stored.items() if n.endswith(f".{ext}")}
    )
    everything = engine.run(items, on_done, metadata=metadata, sink=sink)
    results = [r for r in everything if r.error is None]
    lines = [result_line(engine, r, tar_key, info, shard) for r in results]
    files: list[tuple[str, bytes]] = []
    for r, line in zip(results, lines, strict=True):
        files.append((f"{r.item.id}.{ext}", sink.files[r.key]))
        files.append((f"{r.item.id}.json", (json.dumps(line, ensure_ascii=False) + "\n").encode()))
    data, members = build_tar(files)
    engine.storage.write_bytes(tar_key, data)  # atomic: temp file and rename, or one PUT
    for r, line in zip(results, lines, strict=True):
        m = members[f"{r.item.id}.{ext}"]
        line.update(member=m.name, offset=m.offset, size=m.size)
    return everything, lines
