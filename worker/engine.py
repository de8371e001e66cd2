"""The batch engine: items in, image files out, with the device kept busy.

Per batch: one `torch.Generator` per image (so an image does not depend on its neighbours),
denoise and decode on the device, turn the result into uint8 there, copy it to the host, and
hand PNG/WebP/JPEG encoding and the write to a thread pool so the next batch starts at once.
On CUDA out-of-memory the batch is halved and the work goes on.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagebatch.manifest import BatchInfo
from imagebatch.planning import Item
from imagebatch.storage import Storage, image_key
from imagebatch.worker.pipeline import LoadedPipeline

log = logging.getLogger(__name__)

CPU_AUTO_BATCH = 8
CUDA_AUTO_BATCH = 32


@dataclass
class EngineOptions:
    batch_size: int | None = None  # None: automatic
    image_format: str = "png"
    quality: int = 90
    encode_workers: int = field(default_factory=lambda: max(1, usable_cpus() - 1))
    # Fixed shapes let compiled graphs and cuDNN plans be reused; on the CPU padding is pure waste.
    pad_batches: bool | None = None  # None: on CUDA only
    worker: str = field(default_factory=socket.gethostname)


@dataclass(frozen=True)
class ItemResult:
    item: Item
    key: str
    batch: BatchInfo | None  # None: the image was already stored (skipped)
    encode_seconds: float | None = None


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def encode_image(arr: np.ndarray[Any, np.dtype[np.uint8]], fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if fmt == "png":
        im.save(buf, format="PNG")
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=quality)
    else:
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Engine:
    def __init__(
        self, loaded: LoadedPipeline, storage: Storage, options: EngineOptions | None = None
    ) -> None:
        self.loaded = loaded
        self.storage = storage
        self.opts = options or EngineOptions()
        self.device = loaded.device
        self.pad = self.opts.pad_batches if self.opts.pad_batches is not None else self.device.type == "cuda"
        auto = CUDA_AUTO_BATCH if self.device.type == "cuda" else CPU_AUTO_BATCH
        # Remembered across batches and shards: after an OOM the smaller size sticks.
        self.batch_size = self.opts.batch_size or auto
        self.oom_halvings = 0
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Leave a core to the encoders: oversubscribed OpenMP threads spin and run many times slower.
            torch.set_num_threads(max(1, usable_cpus() - 1))
        self._pool = ThreadPoolExecutor(self.opts.encode_workers, thread_name_prefix="encode")
        params = inspect.signature(loaded.pipe.__call__).parameters
        self._takes_negative = "negative_prompt" in params
        self.images_done = 0
        self.compute_seconds = 0.0

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one batch on the device ---------------------------------------------------------------
    def generate(self, items: Sequence[Item], pad_to: int | None = None) -> torch.Tensor:
        """uint8 images, NHWC, on the host, in item order. All items must share `params_key()`."""
        first = items[0]
        batch = list(items)
        if pad_to and len(batch) < pad_to:
            batch += [batch[-1]] * (pad_to - len(batch))
        kwargs: dict[str, Any] = dict(
            prompt=[it.prompt for it in batch],
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            height=first.height,
            width=first.width,
            # CPU generators: the same seed gives the same noise on any device.
            generator=[torch.Generator("cpu").manual_seed(it.seed) for it in batch],
            output_type="pt",
        )
        if self._takes_negative:
            kwargs["negative_prompt"] = [it.negative_prompt for it in batch]
        with torch.inference_mode():
            images: torch.Tensor = self.loaded.pipe(**kwargs).images[: len(items)]
            u8 = images.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            if u8.device.type == "cuda":
                host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(u8, non_blocking=True)
                torch.cuda.current_stream().synchronize()
                return host
            return u8

    # -- many items -----------------------------------------------------------------------------
    def run(
        self, items: Sequence[Item], on_done: Callable[[ItemResult], None] | None = None
    ) -> list[ItemResult]:
        """Make and store every item whose image is not stored yet; return one result per item."""
        fmt, quality = self.opts.image_format, self.opts.quality
        keys = {it.id: image_key(it.id, fmt) for it in items}
        existing = self.storage.existing(keys.values())
        results: dict[str, ItemResult] = {}
        for it in items:
            if keys[it.id] in existing:
                results[it.id] = ItemResult(it, keys[it.id], None)
                if on_done:
                    on_done(results[it.id])
        todo = sorted((it for it in items if keys[it.id] not in existing), key=lambda it: it.params_key())
        inflight: deque[tuple[Item, BatchInfo, Future[float]]] = deque()

        def drain(block_until: int) -> None:
            while len(inflight) > block_until or (inflight and inflight[0][2].done()):
                it, info, fut = inflight.popleft()
                res = ItemResult(it, keys[it.id], info, fut.result())
                results[it.id] = res
                if on_done:
                    on_done(res)

        # Items with equal generation parameters share batches; groupby keeps their order.
        for _, grouped in groupby(todo, key=lambda it: it.params_key()):
            group = list(grouped)
            pos = 0
            while pos < len(group):
                chunk = group[pos : pos + self.batch_size]
                t0 = time.perf_counter()
                try:
                    host = self.generate(chunk, pad_to=self.batch_size if self.pad else None)
                except Exception as e:
                    if not is_oom(e) or self.batch_size == 1:
                        raise
                    self._halve(len(chunk))
                    continue  # the same items again, in smaller batches
                pos += len(chunk)
                dt = time.perf_counter() - t0
                self.compute_seconds += dt
                self.images_done += len(chunk)
                info = BatchInfo(len(chunk), dt, str(self.device), self.oom_halvings)
                arrays = host.numpy()
                for i, it in enumerate(chunk):
                    fut = self._pool.submit(self._encode_write, arrays[i], keys[it.id], fmt, quality)
                    inflight.append((it, info, fut))
                log.info(
                    "batch of %d at %dx%d, %d steps: %.3fs (%.2f images/s), %d images waiting to be written",
                    len(chunk),
                    chunk[0].width,
                    chunk[0].height,
                    chunk[0].steps,
                    dt,
                    len(chunk) / dt,
                    len(inflight),
                )
                # Bound the images held in memory: at most two batches wait for the encoders.
                drain(block_until=2 * self.batch_size)
        drain(block_until=0)
        return [results[it.id] for it in items]

    def _halve(self, size: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        new = max(1, self.batch_size // 2)
        while new > 1 and new >= size:  # a short last batch failed: go below its size
            new //= 2
        self.batch_size = new
        self.oom_halvings += 1
        log.warning("out of memory at batch size %d: going on with batch size %d", size, self.batch_size)

    def _encode_write(
        self, arr: np.ndarray[Any, np.dtype[np.uint8]], key: str, fmt: str, quality: int
    ) -> float:
        t0 = time.perf_counter()
        self.storage.write_bytes(key, encode_image(arr, fmt, quality))
        return time.perf_counter() - t0
