"""Failpoints stop a worker at a named point, once, and leave a mark that says where."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from imagebatch.worker.failpoints import Failpoint, Failpoints, parse


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("", {}),
        ("image-stored=stop", {"image-stored": Failpoint("image-stored", 1, "stop")}),
        (
            "image-stored@3=stop-once; shard-done@2=hold",
            {
                "image-stored": Failpoint("image-stored", 3, "stop-once"),
                "shard-done": Failpoint("shard-done", 2, "hold"),
            },
        ),
    ],
)
def test_parse(text: str, want: dict[str, Failpoint]) -> None:
    assert parse(text) == want


@pytest.mark.parametrize(
    "text", ["image-stored", "nowhere=stop", "image-stored=explode", "image-stored@x=stop"]
)
def test_parse_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="IMAGEBATCH_FAILPOINTS"):
        parse(text)


def test_unset_does_nothing() -> None:
    Failpoints.from_env({}).hit("image-stored", pod="p", shard="s", items_done=1)


def test_a_point_needs_a_directory() -> None:
    with pytest.raises(ValueError, match="IMAGEBATCH_FAILPOINT_DIR"):
        Failpoints.from_env({"IMAGEBATCH_FAILPOINTS": "shard-done=hold"})


def test_hold_acts_on_the_nth_hit_only_and_ends_on_stop(tmp_path: Path) -> None:
    fp = Failpoints.from_env(
        {"IMAGEBATCH_FAILPOINTS": "shard-done@2=hold", "IMAGEBATCH_FAILPOINT_DIR": str(tmp_path)}
    )
    stop = threading.Event()
    fp.hit("shard-done", pod="w", shard="s1", items_done=5, stop=stop)
    assert not list(tmp_path.glob("shard-done-*.json"))  # the first hit passes
    ran: list[str] = []
    t = threading.Thread(
        target=fp.hit,
        args=("shard-done",),
        kwargs={"pod": "w", "shard": "s2", "items_done": 5, "stop": stop, "before": lambda: ran.append("x")},
    )
    t.start()
    mark = tmp_path / f"shard-done-{os.getpid()}.json"
    while not mark.exists():
        assert t.is_alive()
        time.sleep(0.01)
    assert ran == ["x"]  # `before` ran first: in cluster mode it reports the progress
    assert json.loads(mark.read_text()) == {"pod": "w", "pid": os.getpid(), "shard": "s2", "items_done": 5}
    assert t.is_alive()  # holding
    stop.set()
    t.join()
    fp.hit("shard-done", pod="w", shard="s3", items_done=5, stop=stop)  # once only: no third hold


def test_hold_ends_when_released_and_later_holds_pass(tmp_path: Path) -> None:
    env = {"IMAGEBATCH_FAILPOINTS": "image-stored=hold", "IMAGEBATCH_FAILPOINT_DIR": str(tmp_path)}
    fp = Failpoints.from_env(env)
    t = threading.Thread(
        target=fp.hit, args=("image-stored",), kwargs={"pod": "a", "shard": "s", "items_done": 1}
    )
    t.start()
    while not list(tmp_path.glob("image-stored-*.json")):
        time.sleep(0.01)
    (tmp_path / "release").write_text("")
    t.join()
    # A process that gets there after the release does not hold at all.
    Failpoints.from_env(env).hit("image-stored", pod="b", shard="s", items_done=1)


CHILD = """
import sys
from imagebatch.worker.failpoints import Failpoints
Failpoints.from_env().hit("image-stored", pod=sys.argv[1], shard="s00000", items_done=1)
print("went on", flush=True)
"""


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_stop_once_stops_only_the_first_process(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "IMAGEBATCH_FAILPOINTS": "image-stored=stop-once",
        "IMAGEBATCH_FAILPOINT_DIR": str(tmp_path),
    }
    first = subprocess.Popen(
        [sys.executable, "-c", CHILD, "first"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        mark = tmp_path / f"image-stored-{first.pid}.json"
        while not mark.exists():
            assert first.poll() is None, "the first process went on"
            time.sleep(0.01)
        # The mark is written just before SIGSTOP: wait for the stop itself.
        while _state(first.pid) != "T":
            time.sleep(0.01)
        second = subprocess.run(
            [sys.executable, "-c", CHILD, "second"], env=env, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 0 and "went on" in second.stdout
        assert len(list(tmp_path.glob("image-stored-*.json"))) == 1
        os.kill(first.pid, signal.SIGCONT)
        out, _ = first.communicate(timeout=120)
        assert "went on" in out
    finally:
        if first.poll() is None:
            first.kill()


def test_hold_once_holds_only_the_first_process(tmp_path: Path) -> None:
    env = {"IMAGEBATCH_FAILPOINTS": "image-stored=hold-once", "IMAGEBATCH_FAILPOINT_DIR": str(tmp_path)}
    first, stop = Failpoints.from_env(env), threading.Event()
    t = threading.Thread(
        target=first.hit,
        args=("image-stored",),
        kwargs={"pod": "a", "shard": "s", "items_done": 1, "stop": stop},
    )
    t.start()
    while not list(tmp_path.glob("image-stored-*.json")):
        time.sleep(0.01)
    assert t.is_alive()  # holding
    # Another process (a fresh Failpoints: its own hit count) goes on at once.
    Failpoints.from_env(env).hit("image-stored", pod="b", shard="s", items_done=1)
    stop.set()  # SIGTERM ends the hold
    t.join(timeout=60)
    assert not t.is_alive()


def test_crash_once_raises_in_the_first_process_only(tmp_path: Path) -> None:
    env = {"IMAGEBATCH_FAILPOINTS": "shard-done=crash-once", "IMAGEBATCH_FAILPOINT_DIR": str(tmp_path)}
    with pytest.raises(RuntimeError, match="failpoint shard-done@1: crash-once"):
        Failpoints.from_env(env).hit("shard-done", pod="a", shard="s", items_done=1)
    assert list(tmp_path.glob("shard-done-*.json"))  # the mark says who crashed
    Failpoints.from_env(env).hit("shard-done", pod="b", shard="s", items_done=1)  # goes on
