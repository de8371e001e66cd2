"""Processing one shard: the engine makes its missing images, then its manifest part is written.

Shared by local mode and cluster mode, so both write the same keys and the same lines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from imagebatch.manifest import ModelInfo, manifest_line, write_part
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
) -> list[dict[str, Any]]:
    """Make the shard's images (skipping stored ones) and write its manifest part; return its lines."""
    info = model_info(engine.loaded)
    results = engine.run(items, on_done)
    lines = [
        manifest_line(
            r.item,
            r.key,
            info,
            shard,
            engine.opts.worker,
            r.batch,
            r.encode_seconds,
            truncated=r.truncated,
            labels=engine.opts.labels,
        )
        for r in results
    ]
    # The part is written last: its presence means every image of the shard is stored.
    write_part(engine.storage, shard, lines)
    return lines
