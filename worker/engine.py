"""The batch engine: items in, image files out, with the device kept busy.

Per batch: one `torch.Generator` per image (so an image does not depend on its neighbours),
denoise and decode on the device, turn the result into uint8 there, copy it to the host, and
hand PNG/WebP/JPEG encoding, the image's metadata and the write to a thread pool so the next
batch starts at once. The next batch's prompts are tokenised and text-encoded while this one
denoises (worker/textenc.py). On the CPU batches run in lanes side by side, one per
core, each with its share of torch's intra-op threads: the convolutions of a small model scale
poorly over threads, and a lane of one thread never waits at a barrier for a preempted sibling.
On CUDA out-of-memory the batch is halved and the work goes on. A batch that fails otherwise is
split to find the items that fail it (worker/itemfail.py): those are reported, the rest are made.
A stop flag is checked after every denoising step, so an abandoned batch ends within one step
instead of running to its end.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io
import json
import logging
import os
import socket
import threading
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

from imagebatch.layouts import ImageFiles, ShardWriter
from imagebatch.manifest import BatchInfo
from imagebatch.planning import Item
from imagebatch.storage import Storage
from imagebatch.worker import imagemeta, itemfail
from imagebatch.worker.pipeline import LoadedPipeline
from imagebatch.worker.textenc import Prepared, TextPreparer

log = logging.getLogger(__name__)

CPU_AUTO_BATCH = 8


@dataclass
class EngineOptions:
    batch_size: int | None = None  # None: automatic
    image_format: str = "png"
    quality: int = 90
    encode_workers: int = field(default_factory=lambda: max(1, usable_cpus() - 1))
    # Fixed shapes let compiled graphs and cuDNN plans be reused; on the CPU padding is pure waste.
    pad_batches: bool | None = None  # None: on CUDA only
    worker: str = field(default_factory=socket.gethostname)
    # A JSON file that remembers the automatic batch size found per model, GPU and image shape.
    batch_memory: str | None = None
    # Set (e.g. by SIGTERM): the running batch stops after its current denoising step.
    stop: threading.Event | None = None
    # Encode the next batch's text in a thread while this one denoises (on CUDA on a side stream);
    # False: right before its batch. Encoding inline on the CPU measured slower, not faster
    # (benchmarks/results/cpu-2core-engine-bisect.jsonl: new_1lane against main).
    prepare_ahead: bool = True
    # Text embeddings made by the engine (each negative prompt encoded once); False: the prompt
    # strings are passed to pipe(...), which encodes every prompt and negative itself.
    embeds: bool = True
    # Extra fields of every manifest line this engine makes (cluster mode: rank, visible device).
    labels: dict[str, Any] = field(default_factory=dict)
    # Called with a batch's items right before the pipeline runs them (tests: worker/failpoints.py).
    before_batch: Callable[[Sequence[Item]], None] | None = None
    # Batches made side by side, each in its own thread with an equal share of torch's intra-op
    # threads. None: one per CPU core on the CPU (a small model's convolutions use one thread far
    # better than two, and a lane never waits for a preempted sibling thread); 1 on CUDA.
    lanes: int | None = None


class BatchAbandonedError(Exception):
    """The stop flag was set: the batch was dropped after its current denoising step."""


@dataclass(frozen=True)
class ItemResult:
    item: Item
    key: str
    batch: BatchInfo | None  # None: the image was already stored (skipped)
    encode_seconds: float | None = None
    truncated: bool = False  # the prompt had more tokens than the text encoder reads
    error: itemfail.ItemError | None = None  # set: this item could not be made (no image)


class ItemEncodeError(Exception):
    """An image could not be encoded: that item's failure, not a storage error."""


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def default_lanes(device: torch.device) -> int:
    """Lanes of batches side by side: one per core on the CPU (no more than torch's threads, so
    OMP_NUM_THREADS=1 keeps a worker on one core), one on CUDA."""
    return 1 if device.type == "cuda" else max(1, min(usable_cpus(), torch.get_num_threads()))


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def encode_image(
    arr: np.ndarray[Any, np.dtype[np.uint8]], fmt: str, quality: int, meta: dict[str, Any] | None = None
) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    extra = imagemeta.save_options(fmt, meta) if meta else {}
    if fmt == "png":
        im.save(buf, format="PNG", **extra)
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=quality, **extra)
    else:
        im.save(buf, format="JPEG", quality=quality, **extra)
    return buf.getvalue()


@dataclass
class HostImages:
    """A batch's uint8 images on the host; on CUDA the copy may still be in flight."""

    array: torch.Tensor  # NHWC uint8, pinned on CUDA
    ready: torch.cuda.Event | None = None

    def wait(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.array


def auto_batch_cap(device: torch.device, width: int, height: int) -> int:
    """The first batch size tried: 64 at 512x512 on CUDA, fewer for more pixels (16 at 1024x1024)."""
    if device.type != "cuda":
        return CPU_AUTO_BATCH
    return max(1, min(64, (64 * 512 * 512) // (width * height)))


class Engine:
    def __init__(
        self, loaded: LoadedPipeline, storage: Storage, options: EngineOptions | None = None
    ) -> None:
        self.loaded = loaded
        self.storage = storage
        self.opts = options or EngineOptions()
        self.device = loaded.device
        self.pad = self.opts.pad_batches if self.opts.pad_batches is not None else self.device.type == "cuda"
        # An explicit size is halved on OOM and the smaller size sticks for the process.
        self.batch_size = self.opts.batch_size or auto_batch_cap(self.device, 512, 512)
        # Automatic sizes are per image shape, and remembered in a file across restarts.
        self._auto_sizes: dict[str, int] = self._load_sizes()
        self.oom_halvings = 0
        self.vae_sliced = False
        self._pool = ThreadPoolExecutor(self.opts.encode_workers, thread_name_prefix="encode")
        params = inspect.signature(loaded.pipe.__call__).parameters
        self._takes_step_callback = "callback_on_step_end" in params
        self.text = TextPreparer(loaded.pipe, self.device)
        self.ahead = self.opts.prepare_ahead
        # One thread: batch k+1's text is encoded while batch k denoises, never further ahead.
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="text")
        self.steps_run = 0  # denoising steps, counted by the step callback
        lanes = self.opts.lanes
        self.lanes = max(1, lanes if lanes is not None else default_lanes(self.device))
        if not hasattr(loaded.pipe, "scheduler"):  # a lane copies the pipeline's per-call state
            self.lanes = 1
        self._parent: Engine | None = None  # a lane's engine: batch sizes are the parent's
        self._lanes: list[Engine] = []  # made at the first run that has work for more than one
        self._oom_lock = threading.Lock()
        # Any of these set stops the work: the caller's flag, and in a lane its siblings' failure.
        self._stops: list[threading.Event] = [self.opts.stop] if self.opts.stop is not None else []

    def close(self) -> None:
        for lane in self._lanes:
            lane._ahead.shutdown(wait=True)
        self._ahead.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    def stopped(self) -> bool:
        return any(e.is_set() for e in self._stops)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- batch sizes ----------------------------------------------------------------------------
    def _size_key(self, it: Item) -> str:
        dev = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{self.loaded.model}|{self.loaded.pipeline_class}|{dev}|{self.loaded.dtype}|{it.width}x{it.height}"

    def _load_sizes(self) -> dict[str, int]:
        path = self.opts.batch_memory
        if not path or not os.path.exists(path):
            return {}
        try:
            with open(path) as f:
                data = json.load(f)
            return {str(k): int(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            log.warning("ignoring unreadable batch-size memory %s", path)
            return {}

    def _save_sizes(self) -> None:
        path = self.opts.batch_memory
        if not path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self._auto_sizes, f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    def batch_size_for(self, it: Item) -> int:
        if self._parent is not None:
            return self._parent.batch_size_for(it)
        if self.opts.batch_size:
            return self.batch_size
        key = self._size_key(it)
        if key not in self._auto_sizes:
            self._auto_sizes[key] = auto_batch_cap(self.device, it.width, it.height)
        return self._auto_sizes[key]

    def _on_oom(self, it: Item, size: int) -> None:
        """Free memory for the retry: first decode the VAE in slices, then halve the batch."""
        if self._parent is not None:
            with self._parent._oom_lock:  # lanes share one batch size
                self._parent._on_oom(it, size)
            self.oom_halvings = self._parent.oom_halvings
            return
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        vae = getattr(self.loaded.pipe, "vae", None)
        if not self.vae_sliced and size > 1 and hasattr(vae, "enable_slicing"):
            vae.enable_slicing()  # type: ignore[union-attr]
            self.vae_sliced = True
            log.warning(
                "out of memory at batch size %d: decoding the VAE one image at a time from now on", size
            )
            return
        current = self.batch_size_for(it)
        new = max(1, current // 2)
        while new > 1 and new >= size:  # a short last batch failed: go below its size
            new //= 2
        self.oom_halvings += 1
        if self.opts.batch_size:
            self.batch_size = new
        else:
            self._auto_sizes[self._size_key(it)] = new
            self._save_sizes()
        log.warning("out of memory at batch size %d: going on with batch size %d", size, new)

    # -- one batch on the device ---------------------------------------------------------------
    @staticmethod
    def padded(items: Sequence[Item], pad_to: int | None) -> list[Item]:
        batch = list(items)
        if pad_to and len(batch) < pad_to:
            batch += [batch[-1]] * (pad_to - len(batch))
        return batch

    def prepare(self, items: Sequence[Item], pad_to: int | None = None) -> Prepared:
        """The batch's text inputs: embeddings (with cached negatives), or the prompt strings."""
        batch = self.padded(items, pad_to)
        if self.opts.embeds:
            return self.text.prepare(batch)
        # The old way, for comparison: pipe(...) tokenises and encodes every prompt itself.
        kwargs: dict[str, Any] = {"prompt": [it.prompt for it in batch]}
        if self.text.takes_negative:
            kwargs["negative_prompt"] = [it.negative_prompt for it in batch]
        return Prepared(kwargs, self.text.truncated(kwargs["prompt"]))

    def _on_step(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        self.steps_run += 1
        if self.stopped():
            raise BatchAbandonedError(f"stopped after denoising step {step + 1}")
        return {}

    def generate_async(
        self, items: Sequence[Item], pad_to: int | None = None, prepared: Prepared | None = None
    ) -> HostImages:
        """Denoise and decode one batch; the images reach the host asynchronously on CUDA."""
        first = items[0]
        batch = self.padded(items, pad_to)
        if prepared is None:
            prepared = self.prepare(items, pad_to)
        kwargs: dict[str, Any] = dict(
            prepared.kwargs,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            height=first.height,
            width=first.width,
            # CPU generators: the same seed gives the same noise on any device.
            generator=[torch.Generator("cpu").manual_seed(it.seed) for it in batch],
            output_type="pt",
        )
        if self._takes_step_callback:
            kwargs["callback_on_step_end"] = self._on_step
        prepared.wait()
        if self.opts.before_batch is not None:
            self.opts.before_batch(items)
        with torch.inference_mode():
            images: torch.Tensor = self.loaded.pipe(**kwargs).images[: len(items)]
            # uint8 on the device: a quarter of the bytes to copy, and no float work on the host.
            u8 = images.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            if u8.device.type != "cuda":
                return HostImages(u8)
            host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(u8, non_blocking=True)
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record()
            return HostImages(host, ready)

    def generate(self, items: Sequence[Item], pad_to: int | None = None) -> torch.Tensor:
        """uint8 images, NHWC, on the host, in item order. All items must share `params_key()`."""
        return self.generate_async(items, pad_to).wait()

    # -- many items -----------------------------------------------------------------------------
    def run(
        self,
        items: Sequence[Item],
        on_done: Callable[[ItemResult], None] | None = None,
        metadata: Callable[[Item], dict[str, Any]] | None = None,
        sink: ShardWriter | None = None,
    ) -> list[ItemResult]:
        """Make and store every item whose image is not stored yet; return one result per item.

        `metadata` gives what each image file carries about itself; `sink` names each image's key
        and stores it (the output layout's shard writer, imagebatch/layouts.py); without one,
        images go to loose files in this engine's storage.
        """
        if self.lanes > 1:
            return self._run_lanes(items, on_done, metadata, sink)
        return self._run_one(items, on_done, metadata, sink)

    def _run_one(
        self,
        items: Sequence[Item],
        on_done: Callable[[ItemResult], None] | None = None,
        metadata: Callable[[Item], dict[str, Any]] | None = None,
        sink: ShardWriter | None = None,
    ) -> list[ItemResult]:
        """run() in this thread, one batch after another."""
        out = sink if sink is not None else ImageFiles(self.storage, self.opts.image_format)
        keys = {it.id: out.key(it.id) for it in items}
        existing = out.existing(keys.values())
        results: dict[str, ItemResult] = {}
        stored = [it for it in items if keys[it.id] in existing]
        # A resumed item's line says whether its prompt was cut, as the first run's did.
        cut = dict(
            zip([it.id for it in stored], self.text.truncated([it.prompt for it in stored]), strict=True)
        )
        for it in items:
            if keys[it.id] in existing:
                results[it.id] = ItemResult(it, keys[it.id], None, truncated=cut[it.id])
                if on_done:
                    on_done(results[it.id])
        todo = sorted((it for it in items if keys[it.id] not in existing), key=lambda it: it.params_key())
        inflight: deque[tuple[Item, BatchInfo, Future[float], bool]] = deque()

        def drain(block_until: int) -> None:
            while len(inflight) > block_until or (inflight and inflight[0][2].done()):
                it, info, fut, cut = inflight.popleft()
                try:
                    res = ItemResult(it, keys[it.id], info, fut.result(), cut)
                except ItemEncodeError as e:
                    res = ItemResult(it, keys[it.id], None, error=itemfail.describe(e.__cause__ or e, it))
                results[it.id] = res
                if on_done:
                    on_done(res)

        def failed(it: Item, error: itemfail.ItemError) -> None:
            log.warning("item %s could not be made: %s", it.id, error.type)
            results[it.id] = ItemResult(it, keys[it.id], None, error=error)
            if on_done:
                on_done(results[it.id])

        # Items with equal generation parameters share batches; groupby keeps their order.
        groups = [list(g) for _, g in groupby(todo, key=lambda it: it.params_key())]
        ahead: tuple[list[str], Future[Prepared]] | None = None

        def chunk_at(gi: int, pos: int) -> tuple[list[Item], int | None]:
            size = self.batch_size_for(groups[gi][pos])
            return groups[gi][pos : pos + size], size if self.pad else None

        def take(chunk: list[Item], pad_to: int | None) -> Prepared:
            """The chunk's text inputs: from the thread if it guessed this chunk, else made now."""
            nonlocal ahead
            t0 = time.perf_counter()
            ids = [it.id for it in self.padded(chunk, pad_to)]
            guess, ahead = ahead, None
            if guess is not None and guess[0] == ids:
                prepared = guess[1].result()
            else:  # the first batch, or the batch size changed after an out-of-memory error
                prepared = self.prepare(chunk, pad_to)
            self.text.stats.wait_seconds += time.perf_counter() - t0
            return prepared

        def start_next(gi: int, pos: int) -> None:
            nonlocal ahead
            if pos >= len(groups[gi]):
                gi, pos = gi + 1, 0
            if gi >= len(groups):
                return
            if not self.ahead:
                return
            chunk, pad_to = chunk_at(gi, pos)
            ids = [it.id for it in self.padded(chunk, pad_to)]
            ahead = (ids, self._ahead.submit(self.prepare, chunk, pad_to))

        gi, pos = 0, 0
        while gi < len(groups):
            group = groups[gi]
            if pos >= len(group):
                gi, pos = gi + 1, 0
                continue
            if self.stopped():
                raise BatchAbandonedError("stopped before the next batch")
            chunk, pad_to = chunk_at(gi, pos)
            size = self.batch_size_for(chunk[0])
            t0 = time.perf_counter()
            try:
                prepared = take(chunk, pad_to)
                start_next(gi, pos + len(chunk))
                host = self.generate_async(chunk, pad_to=pad_to, prepared=prepared)
                parts = [itemfail.Part(chunk, host, prepared.truncated, 0.0)]
            except Exception as e:
                if is_oom(e) and size > 1:
                    self._on_oom(chunk[0], len(chunk) if not self.pad else size)
                    continue  # the same items again, with more memory to spare
                parts = self._isolate(chunk, pad_to, e, failed)
            pos += len(chunk)
            dt = time.perf_counter() - t0
            for part in parts:
                n, secs = len(part.items), part.seconds or dt
                info = BatchInfo(n, secs, str(self.device), self.oom_halvings)
                for i, it in enumerate(part.items):
                    # The image's metadata is made by the encoder too: none of it on the loop's path.
                    fut = self._pool.submit(self._encode_write, out, part.made, i, keys[it.id], it, metadata)
                    inflight.append((it, info, fut, part.truncated[i]))
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
            drain(block_until=2 * size)
        drain(block_until=0)
        return [results[it.id] for it in items]

    def _isolate(
        self,
        chunk: list[Item],
        pad_to: int | None,
        error: Exception,
        failed: Callable[[Item, itemfail.ItemError], None],
    ) -> list[itemfail.Part]:
        """The parts of a failed batch that can be made (each made), after reporting the items
        that fail alone; raises what is not an item's error (worker/itemfail.py)."""

        def make(items: list[Item]) -> tuple[HostImages, list[bool]]:
            prepared = self.prepare(items, pad_to)
            return self.generate_async(items, pad_to=pad_to, prepared=prepared), prepared.truncated

        def not_items(e: BaseException) -> bool:
            return is_oom(e) or isinstance(e, BatchAbandonedError)

        parts, bad = itemfail.isolate(chunk, error, make, not_items)
        log.warning(
            "a batch of %d failed (%s): %d of its items fail alone, the other %d are made",
            len(chunk),
            type(error).__name__,
            len(bad),
            len(chunk) - len(bad),
        )
        for it, err in bad:
            failed(it, err)
        return parts

    # -- lanes: batches side by side on the CPU ---------------------------------------------------
    def _lane_engines(self) -> list[Engine]:
        """Engines that share this one's modules, text preparer and encoders, each with its own
        pipeline object (a diffusers pipeline keeps per-call state, and its scheduler per-step)."""
        while len(self._lanes) < self.lanes:
            pipe = copy.copy(self.loaded.pipe)
            # Its own scheduler (per-step state) and tokenizers (not thread-safe) for pipe(...).
            for name in ("scheduler", "tokenizer", "tokenizer_2"):
                part = getattr(self.loaded.pipe, name, None)
                if part is not None:
                    object.__setattr__(pipe, name, copy.deepcopy(part))
            loaded = dataclasses.replace(self.loaded, pipe=pipe)
            lane = Engine(loaded, self.storage, dataclasses.replace(self.opts, lanes=1, encode_workers=1))
            lane._pool.shutdown(wait=False)
            lane._pool, lane.text, lane._parent = self._pool, self.text, self
            self._lanes.append(lane)
        return self._lanes

    def _run_lanes(
        self,
        items: Sequence[Item],
        on_done: Callable[[ItemResult], None] | None,
        metadata: Callable[[Item], dict[str, Any]] | None,
        sink: ShardWriter | None,
    ) -> list[ItemResult]:
        """The items' batches dealt round-robin to the lanes, each lane running them in order."""
        ordered = sorted(items, key=lambda it: it.params_key())
        chunks = []
        for _, g in groupby(ordered, key=lambda it: it.params_key()):
            group = list(g)
            size = self.batch_size_for(group[0])
            chunks += [group[i : i + size] for i in range(0, len(group), size)]
        n = min(self.lanes, len(chunks))
        if n <= 1:  # one batch: nothing to run beside it
            return self._run_one(items, on_done, metadata, sink)
        parts: list[list[Item]] = [[] for _ in range(n)]
        for k, chunk in enumerate(chunks):
            parts[k % n].extend(chunk)
        lanes = self._lane_engines()[:n]
        halt = threading.Event()
        lock = threading.Lock()

        def done(r: ItemResult) -> None:
            if on_done:
                with lock:  # callers count and draw progress: one result at a time
                    on_done(r)

        threads = torch.get_num_threads()
        per_lane = max(1, threads // n)

        def work(lane: Engine, part: list[Item]) -> list[ItemResult]:
            torch.set_num_threads(per_lane)  # torch's intra-op pool size is process-wide
            try:
                return lane._run_one(part, done, metadata, sink)
            except BaseException:
                halt.set()  # the other lanes stop after their current step
                raise

        for lane in lanes:
            lane.storage, lane._stops = self.storage, [*self._stops, halt]
            lane.steps_run = 0
        with ThreadPoolExecutor(n, thread_name_prefix="lane") as pool:
            futs = [pool.submit(work, lane, part) for lane, part in zip(lanes, parts, strict=True)]
            errors = [f.exception() for f in futs]
        torch.set_num_threads(threads)
        self.steps_run += sum(lane.steps_run for lane in lanes)
        # The first real error, not a sibling's stop that it caused.
        real = [e for e in errors if e is not None and not isinstance(e, BatchAbandonedError)]
        if real or any(errors):
            raise (real or [e for e in errors if e is not None])[0]
        results = {r.item.id: r for f in futs for r in f.result()}
        return [results[it.id] for it in items]

    def _encode_write(
        self,
        out: ShardWriter,
        host: HostImages,
        index: int,
        key: str,
        item: Item,
        metadata: Callable[[Item], dict[str, Any]] | None,
    ) -> float:
        t0 = time.perf_counter()
        meta = metadata(item) if metadata else None
        arr: np.ndarray[Any, np.dtype[np.uint8]] = host.wait()[index].numpy()
        try:
            data = encode_image(arr, self.opts.image_format, self.opts.quality, meta)
        except Exception as e:  # this image's failure; a failed write (storage) is not one
            raise ItemEncodeError(str(e)) from e
        out.write_bytes(key, data)
        return time.perf_counter() - t0
