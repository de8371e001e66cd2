"""Cluster mode: a worker pod claims shards of one ImageBatchJob until none is left.

    list the job's shards once and keep them by a watch (worker/shardcache.py)
    load the pipeline once
    loop: claim a Pending one from the cache (a status write fenced by resourceVersion; a
          conflict means another worker won, so try the next) → renew the lease in a thread while
          `process_shard` makes the images and the manifest part → mark it Done (fenced by
          holder + attempt: a worker that lost its claim cannot)
    exit 0 once a fresh list shows nothing Pending, even while others hold claims (the pod's
    quota and GPU follow the backlog); the worker that finds every shard Done joins
    manifest.jsonl.

On SIGTERM (scale-in, suspend, drain) the current batch stops after its denoising step (the
engine checks the stop flag between steps), the claim is released (back to
Pending; its stored images are skipped by the next holder) and the process exits 143, which the
Job's podFailurePolicy ignores. Python runs a signal handler only between bytecodes of the main
thread, so a main thread inside one long native call (a CUDA kernel, a hung read) would not see
SIGTERM before its SIGKILL: the C-level handler also writes the signal to a wakeup fd, and a
thread that reads it releases the claim at once and, if the main thread has not ended by half
the grace period, exits 143 itself. A model that cannot be loaded fails one shard with a
ModelLoadError (the operator fails the job) and exits 3, which fails the Job: no crash loop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import Any

from prometheus_client import Counter, Histogram, start_http_server
from pydantic import ValidationError

from imagebatch import shardstate
from imagebatch.access import PROMPTS_FIELD, AccessPolicy, check_job, local_guard
from imagebatch.api import ImageBatchJobSpec, ImageBatchShardStatus
from imagebatch.errors import ImageBatchError, ModelLoadError, format_validation_error
from imagebatch.manifest import BatchInfo, join_outputs
from imagebatch.names import (
    ANNOTATION_ITEM_COUNT,
    ANNOTATION_MANIFEST_LINES,
    EXIT_MODEL_LOAD_ERROR,
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    MODEL_LOAD_ERROR,
)
from imagebatch.planning import Item, expand_items, shard_id
from imagebatch.prompts import iter_prompts
from imagebatch.shardclient import EarlierIncarnationError
from imagebatch.shardplan import plan_complete, shard_manifests
from imagebatch.storage import MANIFEST, Storage, manifest_part_key, read_options
from imagebatch.timeutil import now_utc
from imagebatch.worker import claims, jobrecord, termination
from imagebatch.worker.failpoints import Failpoints
from imagebatch.worker.kube import JSON, WorkerKube
from imagebatch.worker.shardcache import ShardCache

log = logging.getLogger(__name__)

IMAGES = Counter("imagebatch_worker_images_total", "Images made by this worker")
BATCH_SECONDS = Histogram(
    "imagebatch_worker_batch_seconds",
    "Seconds per denoising batch",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
CLAIM_SECONDS = Histogram("imagebatch_worker_claim_seconds", "Seconds to find and claim a shard")
SHARDS = Counter("imagebatch_worker_shards_total", "Shards finished by this worker", ["result"])


# After losing every race on a view the watch has not caught up with: the longest wait for it.
RACE_WAIT_SECONDS = 1.0
# Writes a claim tries before it looks at the cache again: a lost race means the view is behind,
# and at the tail of a job the shards left are wanted by many workers at once.
CLAIM_TRIES = 3
# Progress reaches the shard's status at most this often, and at least once per lease period.
# Independent of the lease length, so a shard that takes a few seconds still shows its progress.
PROGRESS_SECONDS = 1.0
# Shards created at once by the worker that plans a prompt file.
PLAN_WRITERS = 8


class AbandonError(Exception):
    """SIGTERM arrived: stop after the current batch."""


class LostClaimError(Exception):
    """The lease could not be renewed because the claim is no longer ours."""


@dataclass
class Claim:
    name: str
    index: int
    start: int
    end: int
    attempt: int


class Worker:
    def __init__(
        self,
        kube: WorkerKube,
        pod: str,
        stop: threading.Event,
        device: str = "auto",
        expected_uid: str | None = None,
    ) -> None:
        self.kube = kube
        # The claim holder: the pod's name, or `<pod>/<rank>` for one engine process of a
        # multi-GPU pod (worker/multigpu.py).
        self.pod = pod
        self.labels: dict[str, Any] = {}
        self.device = device
        self.stop = stop
        self._items: list[Item] | None = None
        # The watch-fed view of this job's shards that claims pick from (set by run()).
        self.cache: ShardCache | None = None
        self.last_list: list[JSON] = []  # the fresh list that confirmed nothing is left
        job = kube.get_job()
        if expected_uid is not None and job["metadata"]["uid"] != expected_uid:
            # This pod was made for an earlier ImageBatchJob of the same name, since deleted and
            # re-created: the job it reads now is not its own, and neither are that job's shards.
            meta = job["metadata"]
            raise EarlierIncarnationError(
                "Pod", str(meta.get("namespace")), pod.partition("/")[0], meta["name"]
            )
        self.job = job
        # Read once: the shards this worker counts and claims are this incarnation's, even if the
        # job is deleted and re-created under the same name while the worker runs.
        self.uid = str(job["metadata"]["uid"])
        self.spec = ImageBatchJobSpec.model_validate(job["spec"])
        # Where the job may read and write is the admin's rule (the operator's env): checked
        # before any byte moves, so a refused location fails the job with nothing fetched.
        self.access = AccessPolicy.from_env()
        check_job(self.spec, self.access, environ=os.environ)
        self.storage = Storage.for_output(self.spec.output)
        self.failpoints = Failpoints.from_env()
        # Where this job's parts go in the output (a retry of failed items follows earlier jobs).
        self.admission = jobrecord.Admission()
        # The claim being worked on, for the SIGTERM thread to release at once (watch_signals).
        self.current: Claim | None = None
        self._release_lock = threading.Lock()

    # -- prompts and planning ------------------------------------------------------------------
    def items(self) -> list[Item]:
        if self._items is None:
            prompts = iter_prompts(
                self.spec,
                read_options(self.spec, follow_redirects=False),
                config_map_reader=self.kube.read_config_map,
                guard=local_guard(PROMPTS_FIELD, self.spec, self.access),
            )
            self._items = expand_items(prompts, self.spec.generation)
        return self._items

    def plan_if_needed(self, shards: list[JSON]) -> list[JSON]:
        """A prompt file is planned by the first worker: only workers can read it."""
        if self.spec.prompts_from is None or self.spec.prompts_from.uri is None:
            return shards
        if plan_complete(shards):
            return shards
        items = self.items()
        manifests = shard_manifests(self.job, len(items), self.spec.batching.shard_size)
        # Thousands of small POSTs: a few at a time keep the API server busy instead of waiting on
        # each round trip (1M prompts, 3,907 shards: planning time was mostly this).
        with ThreadPoolExecutor(PLAN_WRITERS, thread_name_prefix="plan") as pool:
            made = sum(pool.map(self.kube.create_shard, manifests))
        log.info("planned %d images in %d shards (%d created here)", len(items), len(manifests), made)
        return self.kube.list_shards(self.uid)

    # -- fenced writes -------------------------------------------------------------------------
    def fenced_write(
        self, claim: Claim, change: Callable[[ImageBatchShardStatus], ImageBatchShardStatus]
    ) -> bool:
        """Applies `change` if the claim is still ours; retries lost races with other writers."""
        for _ in range(10):
            shard = self.kube.get_shard(claim.name)
            if shard is None:
                return False
            st = shardstate.shard_status(shard)
            if not shardstate.holds(st, self.pod, claim.attempt):
                return False
            written = self.kube.replace_shard_status(shard, shardstate.dump(change(st)))
            if written:
                self._observe(written)
                return True
        return False

    def _observe(self, written: JSON | bool) -> None:
        if self.cache is not None and isinstance(written, dict):
            self.cache.observe(written)

    def try_claim(self, shards: list[JSON]) -> Claim | None:
        """Claims the first Pending shard of `shards` it can, in this pod's claim order."""
        return self.claim_first(claims.claim_order(shards, self.pod))

    def claim_first(self, ordered: list[JSON], tries: int | None = None) -> Claim | None:
        """Claims the first shard of `ordered` whose write wins, trying at most `tries`."""
        for shard in ordered[:tries]:
            if self.stop.is_set():
                return None
            st = shardstate.claimed(shardstate.shard_status(shard), self.pod, now_utc())
            written = self.kube.replace_shard_status(shard, shardstate.dump(st))
            if not written:
                # Someone else wrote it since this version: the watch brings who.
                if self.cache is not None:
                    self.cache.lost_race(shard)
                continue
            self._observe(written)
            spec = shard["spec"]
            return Claim(
                shard["metadata"]["name"],
                int(spec["index"]),
                int(spec["start"]),
                int(spec["end"]),
                st.attempt,
            )
        return None

    # -- the loop ------------------------------------------------------------------------------
    def start_cache(self) -> ShardCache:
        self.cache = ShardCache(self.kube, self.uid, self.pod).start()
        self.cache.wait_synced()
        return self.cache

    def next_claim(self) -> Claim | None:
        """The next shard this worker holds, claimed from the cache. None on SIGTERM, or once a
        fresh list shows no Pending shard (then `last_list` is that list)."""
        cache = self.cache
        assert cache is not None, "start_cache() first"
        while not self.stop.is_set():
            cache.check()
            seen = cache.version
            t0 = time.perf_counter()
            claim = self.claim_first(cache.candidates(CLAIM_TRIES))
            if claim is not None:
                CLAIM_SECONDS.observe(time.perf_counter() - t0)
                return claim
            if self.stop.is_set():
                break
            if cache.pending_count():
                # Lost every race on a view the watch has not caught up with: it brings the winners.
                self._wait_change(seen, RACE_WAIT_SECONDS)
                continue
            # Nothing Pending: leave, even while other workers hold claims, so that the pod's
            # quota (Kueue reclaims a Job's succeeded pods) and its GPU follow the backlog. A claim
            # that comes back later is taken by a busy worker (each looks again after its shard)
            # or, once no worker that could take it is left (all gone, or the live ones hung
            # without a claim), by the worker Job the operator starts in its place
            # (operator/workers.py).
            # Leaving is for good: decided on a fresh list (once per worker), not on the cache.
            listed = self.kube.list_shards(self.uid)
            if claims.claim_order(listed, self.pod):
                cache.merge(listed)  # the watch is behind: what the list knows is newer
                continue
            self.last_list = listed
            return None
        return None

    def _wait_change(self, seen: int, timeout: float) -> None:
        """Sleeps until the watch brings a change, SIGTERM, or `timeout`."""
        assert self.cache is not None
        deadline = time.monotonic() + timeout
        # Slices: a signal handler cannot wake a Condition, so the stop flag is looked at often.
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.cache.wait(seen, min(0.5, deadline - time.monotonic())) != seen:
                return
            if self.cache.error is not None:
                return

    def run(self) -> int:
        try:
            return self._run()
        finally:
            if self.cache is not None:
                self.cache.close()

    def _run(self) -> int:
        shards = self.plan_if_needed(self.start_cache().shards())
        from dataclasses import replace

        from imagebatch.worker.engine import Engine
        from imagebatch.worker.run import prepare_run

        try:
            # Stored images are never remade: refuse an output made with other settings, the
            # same check as local mode (and the same job.json, so either mode can resume the other),
            # except for a job that makes the output's failed items (worker/jobrecord.py).
            self.storage.ensure_root()
            self.admission = jobrecord.admit(
                self.storage, str(self.job["metadata"]["name"]), self.spec, self.items(), len(shards)
            )
        except ImageBatchError as e:
            # No retry can fix this: fail a shard with it, so the operator fails the job and says why.
            log.error("%s", e)
            termination.write(str(e))
            self.fail_one(str(e), shards)
            return EXIT_USER_ERROR
        try:
            # The same engine settings as local mode (compile, channels-last, remembered batch size).
            run = prepare_run(self.spec, self.device)
        except ModelLoadError as e:
            log.error("%s", e)
            termination.write(str(e))
            self.fail_one(f"{MODEL_LOAD_ERROR}: {e}", shards)
            return EXIT_MODEL_LOAD_ERROR
        opts = replace(
            run.options,
            worker=self.pod,
            stop=self.stop,
            labels=self.labels,
            before_batch=self.failpoints.before_batch if "batch" in self.failpoints.points else None,
        )
        with Engine(run.loaded, self.storage, opts) as engine:
            while (claim := self.next_claim()) is not None:
                rc = self.work(engine, claim)
                if rc is not None:
                    return rc
        if self.stop.is_set():
            return EXIT_TERMINATED
        self.join_if_all_done(self.last_list)
        log.info("nothing left to claim; exiting")
        return 0

    def work(self, engine: Any, claim: Claim) -> int | None:
        """Processes one claimed shard; an exit code when the worker must stop."""
        from imagebatch.worker.engine import BatchAbandonedError
        from imagebatch.worker.shards import process_shard

        log.info("claimed %s (items %d-%d, attempt %d)", claim.name, claim.start, claim.end, claim.attempt)
        done_items = 0
        failed: list[str] = []  # ids of the items the engine could not make
        last_batch: list[BatchInfo | None] = [None]
        lease = LeaseKeeper(self, claim, lambda: done_items)

        def on_done(r: Any) -> None:
            nonlocal done_items
            done_items += 1
            if r.error is not None:
                failed.append(r.item.id)
            if r.batch is not None and r.batch is not last_batch[0]:
                last_batch[0] = r.batch
                BATCH_SECONDS.observe(r.batch.batch_seconds)
            if r.batch is not None:
                IMAGES.inc()
                self.failpoints.hit(
                    "image-stored",
                    pod=self.pod,
                    shard=claim.name,
                    items_done=done_items,
                    stop=self.stop,
                    before=lease.report_now,
                )
            if lease.lost.is_set():
                raise LostClaimError(claim.name)
            if self.stop.is_set():
                raise AbandonError(claim.name)

        t0 = time.perf_counter()
        lease.start()
        self.current = claim
        try:
            items = self.items()[claim.start : claim.end]
            part = shard_id(self.admission.first_shard + claim.index)
            process_shard(engine, part, items, on_done, self.spec.output.layout)
        except (AbandonError, BatchAbandonedError):
            lease.close()
            ok = self.fenced_write(claim, shardstate.released)
            log.info(
                "stopping: released %s after %d images (%s)", claim.name, done_items, "ok" if ok else "lost"
            )
            SHARDS.labels("released").inc()
            return EXIT_TERMINATED
        except LostClaimError:
            lease.close()
            log.warning("lost the claim on %s (lease expired); dropping it", claim.name)
            SHARDS.labels("lost").inc()
            return None
        except ImageBatchError as e:
            # A user error (unreadable prompts, bad output location) fails the same way every time.
            lease.close()
            msg = str(e)
            self.fenced_write(claim, lambda st: shardstate.failed(st, msg))
            log.error("%s: %s", claim.name, e)
            termination.write(msg)
            SHARDS.labels("failed").inc()
            return EXIT_USER_ERROR
        except Exception as e:
            lease.close()
            err = f"{type(e).__name__}: {e}"
            self.fenced_write(claim, lambda st: shardstate.errored(st, err, self.spec.retries.max_attempts))
            SHARDS.labels("error").inc()
            raise
        finally:
            self.current = None
        lease.close()
        seconds = time.perf_counter() - t0
        n = claim.end - claim.start - len(failed)
        if self.fenced_write(claim, lambda st: shardstate.done(st, now_utc(), n, seconds, failed)):
            log.info("%s done: %d images in %.1fs, %d items failed", claim.name, n, seconds, len(failed))
            SHARDS.labels("done").inc()
            self.failpoints.hit("shard-done", pod=self.pod, shard=claim.name, items_done=n, stop=self.stop)
        else:
            log.warning("%s finished after its claim was lost; another worker owns it now", claim.name)
            SHARDS.labels("lost").inc()
        return None

    def release_now(self) -> None:
        """Gives the claim being worked on back at once (from the SIGTERM thread: the main thread
        may be inside a native call that it will not leave before the pod is killed)."""
        claim = self.current
        if claim is None:
            return
        with self._release_lock:
            ok = self.fenced_write(claim, shardstate.released)
        log.info("SIGTERM: released %s at once (%s)", claim.name, "ok" if ok else "no longer ours")

    def fail_one(self, error: str, shards: list[JSON]) -> None:
        """Reports an error that no retry can fix on a shard, so the operator can fail the job."""
        claim = self.try_claim(shards) or self.try_claim(self.kube.list_shards(self.uid))
        if claim is not None:
            self.fenced_write(claim, lambda st: shardstate.failed(st, error))

    def join_if_all_done(self, shards: list[JSON] | None = None) -> None:
        """The worker that finds every shard Done joins the manifest parts into manifest.jsonl.

        Several may do it at once: they write the same bytes. Shard 0 records the line count,
        which tells the operator the job is complete. `shards`: a list fresh enough to decide on.
        """
        if shards is None:
            shards = self.kube.list_shards(self.uid)
        if not shards:
            return
        first = min(shards, key=lambda s: int(s["spec"]["index"]))
        ann = first["metadata"].get("annotations") or {}
        if ANNOTATION_MANIFEST_LINES in ann or not plan_complete(shards):
            return
        if any(shardstate.shard_status(s).state != "Done" for s in shards):
            return
        offset = self.admission.first_shard
        ordered = sorted(offset + int(s["spec"]["index"]) for s in shards)
        name = str(self.job["metadata"]["name"])
        # The parts of earlier jobs into this output (a retry of failed items comes after them).
        earlier = [shard_id(i) for i in range(offset)]
        found = self.storage.existing(manifest_part_key(p) for p in earlier)
        shard_ids = [p for p in earlier if manifest_part_key(p) in found] + [shard_id(i) for i in ordered]
        expected = int(ann[ANNOTATION_ITEM_COUNT]) if ANNOTATION_ITEM_COUNT in ann else None
        if offset:
            expected = self.admission.items
        lines = join_outputs(self.storage, name, shard_ids, self.spec.output.layout, expected)
        self.kube.annotate_shard(first["metadata"]["name"], {ANNOTATION_MANIFEST_LINES: str(lines)})
        log.info("joined %d manifest lines into %s", lines, self.storage.path(MANIFEST))


class LeaseKeeper(threading.Thread):
    """Keeps a claim: renews its lease every third of its length and reports progress (at most
    every PROGRESS_SECONDS, when it moved); flags `lost` when the claim is no longer ours."""

    def __init__(self, worker: Worker, claim: Claim, progress: Callable[[], int]) -> None:
        super().__init__(name=f"lease-{claim.name}", daemon=True)
        self.worker = worker
        self.claim = claim
        self.progress = progress
        self.period = max(1.0, worker.spec.retries.lease_seconds / 3)
        self.lost = threading.Event()
        self._closed = threading.Event()
        self._write_lock = threading.Lock()
        self._reported = 0  # items done as last written
        self._renewed = time.monotonic()

    def run(self) -> None:
        while not self._closed.wait(min(self.period, PROGRESS_SECONDS)):
            moved = self.progress() != self._reported
            if not moved and time.monotonic() - self._renewed < self.period - 0.05:
                continue
            try:
                self.report_now()
            except Exception as e:  # a flaky API must not kill the worker; the next renewal may work
                log.warning("cannot renew the lease on %s: %s", self.claim.name, e)
                continue
            if self.lost.is_set():
                return

    def report_now(self) -> None:
        """Renews the lease with the current progress, now (from any thread)."""
        with self._write_lock:
            done = self.progress()
            ok = self.worker.fenced_write(self.claim, lambda st: shardstate.renewed(st, now_utc(), done))
            if ok:
                self._reported, self._renewed = done, time.monotonic()
            elif not self._closed.is_set():
                self.lost.set()

    def close(self) -> None:
        self._closed.set()
        if self.is_alive():
            self.join()


def watch_signals(stop: threading.Event, worker: Callable[[], Worker | None]) -> None:
    """Sees SIGTERM within moments whatever the main thread does: Python's C-level handler
    writes each signal to a wakeup fd even while the main thread sits in a native call (where
    the Python-level handler cannot run); a thread reading it releases the claim at once, and
    exits 143 if the main thread has not ended by half the grace period. Main thread only."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def loop() -> None:
        while signal.SIGTERM not in os.read(r, 64):
            pass
        stop.set()
        current = worker()
        if current is not None:
            current.release_now()
        grace = current.spec.workers.termination_grace_period_seconds if current else 30
        time.sleep(max(1.0, grace / 2))
        log.warning(
            "still running %.0fs after SIGTERM (the main thread is inside one long call); exiting now",
            max(1.0, grace / 2),
        )
        os._exit(EXIT_TERMINATED)

    threading.Thread(target=loop, name="sigterm", daemon=True).start()


def run_cluster_worker(
    namespace: str,
    job: str,
    pod: str,
    device: str = "auto",
    metrics_port: int = 0,
    labels: dict[str, Any] | None = None,
) -> int:
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        log.info("got signal %d: finishing the current batch, then releasing the claim", signum)
        stop.set()

    # First of all: a SIGTERM while the model loads must still end in a clean exit.
    signal.signal(signal.SIGTERM, on_term)
    current: list[Worker] = []
    watch_signals(stop, lambda: current[0] if current else None)
    if metrics_port:
        try:
            start_http_server(metrics_port)
        except OSError as e:
            # Metrics are for watching, not for working: a taken port (pods on the host network
            # share ports) must not stop the worker.
            log.warning("not serving metrics: cannot listen on port %d: %s", metrics_port, e)
    try:
        # JOB_UID: set by the operator on the pods of the worker Job (operator/builders.py).
        worker = Worker(WorkerKube(namespace, job), pod, stop, device, os.environ.get("JOB_UID") or None)
        worker.labels = dict(labels or {})
        current.append(worker)
        return worker.run()
    except EarlierIncarnationError as e:
        log.warning("%s: nothing to do here", e)
        return 0
    except ValidationError as e:
        msg = format_validation_error(e, "spec")
        log.error("ImageBatchJob %s/%s: invalid spec\n%s", namespace, job, msg)
        termination.write(msg)
        return EXIT_USER_ERROR
    except ImageBatchError as e:
        log.error("%s", e)
        termination.write(str(e))
        return EXIT_USER_ERROR
