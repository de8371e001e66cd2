"""What local mode and a cluster worker do alike before the first shard: one `prepare_run`."""

from __future__ import annotations

from dataclasses import dataclass

from imagebatch.api import ImageBatchJobSpec
from imagebatch.worker.engine import EngineOptions
from imagebatch.worker.optimize import batch_memory_path, from_spec, optimize
from imagebatch.worker.pipeline import LoadedPipeline, load_pipeline


@dataclass(frozen=True)
class PreparedRun:
    loaded: LoadedPipeline
    options: EngineOptions  # the mode adds its own (worker name, stop flag) with dataclasses.replace


def prepare_run(spec: ImageBatchJobSpec, device: str, batch_size: int | None = None) -> PreparedRun:
    """Loads the job's pipeline (ModelLoadError if it cannot be), applies its engine settings
    (compile, channels-last) and gives the engine's options. `batch_size`: overrides the spec's."""
    loaded = load_pipeline(spec.model, device)
    spec_size = spec.batching.batch_size
    size = batch_size or (spec_size if isinstance(spec_size, int) else None)
    optimize(loaded, from_spec(loaded, spec.engine, size))
    options = EngineOptions(
        batch_size=size,
        image_format=spec.output.format,
        quality=spec.output.quality,
        batch_memory=batch_memory_path(spec.engine),
    )
    return PreparedRun(loaded, options)
