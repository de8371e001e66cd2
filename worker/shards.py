"""Processing one shard: the engine makes its missing images, then its manifest part is written.

Shared by local mode and cluster mode, so both write the same keys and the same lines. The
job's output layout (imagebatch/layouts.py) gives the shard's writer, which the engine writes
images into, and the key each manifest line names; its `finish` writes what holds the images
(webdataset: the shard's tar, in one go) before the part. Items the engine could not make
(worker/itemfail.py) have no image and no manifest line: they are listed in the shard's errors
part, written before its manifest part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from imagebatch.layouts import Made, OutputLayout, layout_for
from imagebatch.manifest import ModelInfo, error_line, manifest_line, write_errors_part, write_part
from imagebatch.planning import Item
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
    layout: str | OutputLayout = "files",
) -> list[dict[str, Any]]:
    """Make the shard's images (skipping stored ones) and write its manifest part; return its lines."""
    info = model_info(engine.loaded)
    worker = engine.opts.worker
    fmt = engine.opts.image_format
    out = layout_for(layout)

    def metadata(it: Item) -> dict[str, Any]:
        # What the image file says about itself: how it was made, not how fast.
        line = manifest_line(it, out.key(shard, it.id, fmt), info, shard, worker, None)
        line.pop("resumed")
        return {k: v for k, v in line.items() if v is not None}

    writer = out.open_shard(engine.storage, shard, items, fmt)
    results = engine.run(items, on_done, metadata=metadata, sink=writer)
    made = [
        Made(r.item, r.key, result_line(engine, r, out.key(shard, r.item.id, fmt), info, shard))
        for r in results
        if r.error is None
    ]
    writer.finish(made)
    errors = [
        error_line(r.item, shard, worker, r.error.type, r.error.message)
        for r in results
        if r.error is not None
    ]
    if errors:
        write_errors_part(engine.storage, shard, errors)
    # The part is written last: its presence means every image of the shard is stored (or listed
    # as failed in the errors part).
    lines = [m.line for m in made]
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
