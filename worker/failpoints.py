"""Failpoints: a worker stops at a named point so that a test can catch it exactly there.

Tests of crashes and leases need a worker in a known state (mid-shard, its progress on the
shard's status) whatever the speed of the machine; racing a poll loop against the engine is
what made them fail on fast machines. Unset (always, outside tests) this costs one dict lookup.

    IMAGEBATCH_FAILPOINTS="image-stored@3=stop-once;shard-done@1=hold"
    IMAGEBATCH_FAILPOINT_DIR=/some/shared/dir

Points (`@N`: the N-th time this process gets there; default 1):
- `image-stored`: an image this process made is stored (cluster mode: its progress is on the
  shard's status before the action);
- `shard-done`: this process marked a shard Done;
- `batch:<item id>` (no `@N`): the engine is about to run a batch that holds that item; with
  this point armed every process records each batch it runs (ids, and whether it raised) in
  `<dir>/batches-<pid>.jsonl`, so a test counts the engine's batch calls.

Actions, each taken once per process:
- `stop`: the process sends itself SIGSTOP (its lease thread stops too, as in a hung node);
- `stop-once`: the same, but only in the first process of all that share the directory;
- `hold`: the engine waits until SIGTERM or until `<dir>/release` exists (its lease thread goes on
  renewing: a hung engine in a live process);
- `hold-once`: the same, but only in the first process of all that share the directory;
- `crash-once`: the first process of all raises an unexpected error (RuntimeError) there, as a
  bug or a broken node would;
- `kill`: every process SIGKILLs itself there (a crash with no deletion: no handler, no release);
- `block`: the main thread enters one native call that Python cannot interrupt (libc `sleep`
  through ctypes, with SIGTERM blocked in that thread, as in a long CUDA kernel) and never
  returns: only SIGKILL ends it. Python's own SIGTERM handler cannot run; other threads can;
- `raise` (for `batch:<id>`): the batch raises FailpointItemError (a ValueError), every time in
  every process, as a prompt the engine cannot take would.

`hold`, `block` and `raise` are disarmed by `<dir>/release` (for processes that get there later).

Before it acts, a process writes `<dir>/<point>-<pid>.json` (pod, pid, shard, items_done), so
the test knows who stopped, and where.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV = "IMAGEBATCH_FAILPOINTS"
ENV_DIR = "IMAGEBATCH_FAILPOINT_DIR"
POINTS = ("image-stored", "shard-done", "batch")
ACTIONS = ("stop", "stop-once", "hold", "hold-once", "crash-once", "kill", "block", "raise")
RELEASE = "release"


class FailpointItemError(ValueError):
    """Raised for a batch holding the item of a `batch:<id>=raise` failpoint."""


@dataclass(frozen=True)
class Failpoint:
    point: str
    nth: int
    action: str
    item: str = ""  # batch:<item id>


def parse(text: str) -> dict[str, Failpoint]:
    """`point[@n]=action;...` -> the failpoint of each point. ValueError names what is wrong."""
    out: dict[str, Failpoint] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        where, sep, action = part.partition("=")
        point, _, nth = where.partition("@")
        point, _, item = point.partition(":")
        if point == "batch":
            well_formed = action == "raise" and bool(item) and not nth
        else:
            well_formed = action != "raise" and not item
        if (
            not sep
            or point not in POINTS
            or action not in ACTIONS
            or (nth and not nth.isdigit())
            or not well_formed
        ):
            raise ValueError(
                f"{ENV}: cannot read {part!r}; want point[@n]=action or batch:<item id>=raise, points "
                f"{POINTS}, actions {ACTIONS}"
            )
        out[point] = Failpoint(point, int(nth or 1), action, item)
    return out


def block_natively() -> None:
    """Never returns: the calling thread sleeps inside libc with SIGTERM and SIGINT blocked, so
    neither interrupts the call and Python cannot run its handlers in this thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    while True:
        libc.sleep(3600)


@dataclass
class Failpoints:
    points: dict[str, Failpoint] = field(default_factory=dict)
    directory: str = ""
    _hits: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Failpoints:
        env = os.environ if env is None else env
        points = parse(env.get(ENV, ""))
        directory = env.get(ENV_DIR, "")
        if points and not directory:
            raise ValueError(f"{ENV} is set but {ENV_DIR} is not")
        return cls(points, directory)

    def hit(
        self,
        point: str,
        *,
        pod: str,
        shard: str,
        items_done: int,
        stop: threading.Event | None = None,
        before: Callable[[], object] | None = None,
    ) -> None:
        fp = self.points.get(point)
        if fp is None:
            return
        with self._lock:
            self._hits[point] = n = self._hits.get(point, 0) + 1
        if n != fp.nth:
            return
        holds = fp.action in ("hold", "hold-once")
        if holds and os.path.exists(os.path.join(self.directory, RELEASE)):
            return
        if fp.action in ("stop-once", "hold-once", "crash-once") and not self._first(point):
            return
        if before is not None:
            before()
        self._mark(point, {"pod": pod, "pid": os.getpid(), "shard": shard, "items_done": items_done})
        if fp.action == "crash-once":
            raise RuntimeError(f"failpoint {point}@{fp.nth}: crash-once")
        if fp.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fp.action == "block":
            if not os.path.exists(os.path.join(self.directory, RELEASE)):
                block_natively()
            return
        if holds:
            release = os.path.join(self.directory, RELEASE)
            waiter = stop or threading.Event()
            while not waiter.wait(0.05) and not os.path.exists(release):
                pass
        else:
            os.kill(os.getpid(), signal.SIGSTOP)

    def before_batch(self, items: Sequence[Any]) -> None:
        """The engine's hook before each batch (EngineOptions.before_batch): records the batch,
        and raises for one that holds the armed item (until released)."""
        fp = self.points.get("batch")
        if fp is None:
            return
        ids = [str(it.id) for it in items]
        raises = fp.item in ids and not os.path.exists(os.path.join(self.directory, RELEASE))
        with self._lock, open(os.path.join(self.directory, f"batches-{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps({"ids": ids, "raised": raises}) + "\n")
        if raises:
            self._mark("batch", {"pid": os.getpid(), "item": fp.item, "batch": len(ids)})
            raise FailpointItemError(f"failpoint batch:{fp.item}: this item cannot be made")

    def _first(self, point: str) -> bool:
        try:
            fd = os.open(os.path.join(self.directory, f"{point}.once"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def _mark(self, point: str, info: dict[str, object]) -> None:
        path = os.path.join(self.directory, f"{point}-{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(path + ".tmp", path)  # atomic: the test polls for the file, then reads it
