"""Failpoints: a worker stops at a named point so that a test can catch it exactly there.

Tests of crashes and leases need a worker in a known state (mid-shard, its progress on the
shard's status) whatever the speed of the machine; racing a poll loop against the engine is
what made them fail on fast machines. Unset (always, outside tests) this costs one dict lookup.

    IMAGEBATCH_FAILPOINTS="image-stored@3=stop-once;shard-done@1=hold"
    IMAGEBATCH_FAILPOINT_DIR=/some/shared/dir

Points (`@N`: the N-th time this process gets there; default 1):
- `image-stored`: an image this process made is stored (cluster mode: its progress is on the
  shard's status before the action);
- `shard-done`: this process marked a shard Done.

Actions, each taken once per process:
- `stop`: the process sends itself SIGSTOP (its lease thread stops too, as in a hung node);
- `stop-once`: the same, but only in the first process of all that share the directory;
- `hold`: the engine waits until SIGTERM or until `<dir>/release` exists (its lease thread goes on
  renewing: a hung engine in a live process);
- `hold-once`: the same, but only in the first process of all that share the directory;
- `crash-once`: the first process of all raises an unexpected error (RuntimeError) there, as a
  bug or a broken node would.

Before it acts, a process writes `<dir>/<point>-<pid>.json` (pod, pid, shard, items_done), so
the test knows who stopped, and where.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

ENV = "IMAGEBATCH_FAILPOINTS"
ENV_DIR = "IMAGEBATCH_FAILPOINT_DIR"
POINTS = ("image-stored", "shard-done")
ACTIONS = ("stop", "stop-once", "hold", "hold-once", "crash-once")
RELEASE = "release"


@dataclass(frozen=True)
class Failpoint:
    point: str
    nth: int
    action: str


def parse(text: str) -> dict[str, Failpoint]:
    """`point[@n]=action;...` -> the failpoint of each point. ValueError names what is wrong."""
    out: dict[str, Failpoint] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        where, sep, action = part.partition("=")
        point, _, nth = where.partition("@")
        if not sep or point not in POINTS or action not in ACTIONS or (nth and not nth.isdigit()):
            raise ValueError(
                f"{ENV}: cannot read {part!r}; want point[@n]=action, points {POINTS}, actions {ACTIONS}"
            )
        out[point] = Failpoint(point, int(nth or 1), action)
    return out


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
        if holds:
            release = os.path.join(self.directory, RELEASE)
            waiter = stop or threading.Event()
            while not waiter.wait(0.05) and not os.path.exists(release):
                pass
        else:
            os.kill(os.getpid(), signal.SIGSTOP)

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
