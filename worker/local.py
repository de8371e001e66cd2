"""Local mode: a whole ImageBatchJob in one process, resumable, with a progress bar."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from imagebatch.api import ImageBatchJob
from imagebatch.errors import ImageBatchError
from imagebatch.fingerprint import fingerprint, image_fields
from imagebatch.manifest import join_outputs
from imagebatch.planning import expand_items, plan_shards
from imagebatch.prompts import iter_prompts
from imagebatch.storage import MANIFEST, Storage, manifest_part_key, storage_options
from imagebatch.worker.engine import Engine, ItemResult
from imagebatch.worker.failpoints import Failpoints
from imagebatch.worker.run import prepare_run
from imagebatch.worker.shards import process_shard

log = logging.getLogger(__name__)
JOB_RECORD = "job.json"


@dataclass
class RunSummary:
    items: int
    made: int
    skipped: int
    seconds: float
    output: str

    @property
    def images_per_second(self) -> float:
        return self.made / self.seconds if self.seconds > 0 else 0.0


def check_job_record(storage: Storage, name: str, digest: str) -> None:
    """Refuse an output that holds images made with other settings; record ours otherwise."""
    if storage.exists(JOB_RECORD):
        record = json.loads(storage.read_bytes(JOB_RECORD))
        if record.get("fingerprint") != digest:
            raise ImageBatchError(
                f"spec.output.uri: {storage.uri!r} holds images of job {record.get('job')!r} made with other "
                "settings (model, generation, format or prompts differ), and stored images are never remade; "
                "point spec.output.uri at a new location, or delete the old output"
            )
        return
    storage.write_bytes(JOB_RECORD, json.dumps({"job": name, "fingerprint": digest}).encode())


def run_local(
    job: ImageBatchJob,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> RunSummary:
    spec = job.spec
    t0 = time.perf_counter()
    # Everything that can fail on bad input happens before anything is written.
    items = expand_items(iter_prompts(spec, storage_options(spec.output)), spec.generation)
    shards = plan_shards(len(items), spec.batching.shard_size)
    storage = Storage.for_output(spec.output)
    run = prepare_run(spec, device, batch_size)

    storage.ensure_root()
    check_job_record(storage, job.metadata.name, fingerprint(image_fields(spec), items))
    if removed := storage.remove_interrupted_writes():
        log.info("removed %d temp files of writes interrupted by an earlier crash", removed)
    done_parts = storage.existing(manifest_part_key(s.id) for s in shards)
    todo = [s for s in shards if manifest_part_key(s.id) not in done_parts]
    already = sum(len(s) for s in shards) - sum(len(s) for s in todo)
    if already:
        log.info("resuming: %d of %d shards were already done", len(shards) - len(todo), len(shards))

    made = skipped = 0
    failpoints = Failpoints.from_env()
    current = ""  # the shard being made, for the failpoints' record
    bar = tqdm(
        total=len(items),
        initial=already,
        unit="img",
        desc=job.metadata.name,
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )

    def on_done(r: ItemResult) -> None:
        nonlocal made, skipped
        if r.batch is None:
            skipped += 1
        else:
            made += 1
            failpoints.hit("image-stored", pod="local", shard=current, items_done=made)
        bar.update(1)

    with logging_redirect_tqdm(), bar, Engine(run.loaded, storage, run.options) as engine:
        for shard in todo:
            current = shard.id
            process_shard(engine, shard.id, items[shard.start : shard.end], on_done, spec.output.layout)

    join_outputs(storage, job.metadata.name, [s.id for s in shards], spec.output.layout, len(items))
    summary = RunSummary(len(items), made, skipped + already, time.perf_counter() - t0, spec.output.uri)
    log.info(
        "done: %d images (%d made, %d already stored) in %.1fs; manifest at %s",
        summary.items,
        summary.made,
        summary.skipped,
        summary.seconds,
        storage.path(MANIFEST),
    )
    return summary
