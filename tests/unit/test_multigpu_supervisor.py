"""The multi-GPU worker pod: devices, identities, exit codes, and the supervisor's handling of
crashed children (real child processes; the claim release is recorded, not sent to a cluster)."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from imagebatch.holders import holder_pod, rank_holder
from imagebatch.names import EXIT_MODEL_LOAD_ERROR, EXIT_TERMINATED
from imagebatch.operator.leases import ClaimClock, review
from imagebatch.timeutil import format_micro
from imagebatch.worker import multigpu
from imagebatch.worker.multigpu import Supervisor, child_env, pod_exit_code, visible_devices

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def claimed(name: str, holder: str, age: float) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "resourceVersion": "7"},
        "spec": {"index": 0, "start": 0, "end": 10},
        "status": {
            "state": "Claimed",
            "holder": holder,
            "attempt": 1,
            "leaseRenewTime": format_micro(NOW - timedelta(seconds=age)),
        },
    }


def test_devices_from_the_gpu_count_or_cuda_visible_devices() -> None:
    assert visible_devices({}) == []
    assert visible_devices({"IMAGEBATCH_GPUS": "1"}) == ["0"]
    assert visible_devices({"IMAGEBATCH_GPUS": "2"}) == ["0", "1"]
    assert visible_devices({"IMAGEBATCH_GPUS": "8", "CUDA_VISIBLE_DEVICES": "3, 5"}) == ["3", "5"]
    env = child_env({"IMAGEBATCH_GPUS": "2", "PATH": "/bin"}, "1")
    assert env == {"IMAGEBATCH_GPUS": "1", "CUDA_VISIBLE_DEVICES": "1", "PATH": "/bin"}
    # A child sees one device, so it never supervises again.
    assert visible_devices(env) == ["1"]


def test_rank_holders_belong_to_their_pod() -> None:
    assert rank_holder("w-abc", 1) == "w-abc/1"
    assert holder_pod("w-abc/1") == holder_pod("w-abc") == "w-abc"
    # The operator leaves a live pod's rank claims alone, and requeues them when the pod is gone.
    shards = [claimed("a", "w-abc/1", age=5)]
    clock = ClaimClock()
    clock.observe(shards, 0.0, gap=15)
    assert review(shards, {"w-abc"}, clock, 0.0, 30, 100, 3) == []
    (t,) = review(shards, {"w-other"}, clock, 0.0, 30, 100, 3)
    assert t.reason == "HolderGone"


def test_pod_exit_code() -> None:
    assert pod_exit_code([0, 0], terminated=False) == 0
    assert pod_exit_code([0, EXIT_MODEL_LOAD_ERROR], terminated=False) == EXIT_MODEL_LOAD_ERROR
    assert pod_exit_code([EXIT_TERMINATED, EXIT_TERMINATED], terminated=True) == EXIT_TERMINATED
    assert pod_exit_code([0, -9], terminated=False) == 1


class Recording(Supervisor):
    """Children are small scripts; the claim release is recorded instead of written."""

    def __init__(self, script: str, tmp: Path, devices: list[str]) -> None:
        super().__init__("ns", "job", "pod-x", devices)
        self.script = script
        self.tmp = tmp
        self.released: list[str] = []

    def argv(self, rank: int) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.tmp), str(rank)]

    def release_claims(self, holder: str) -> int:
        self.released.append(holder)
        return 1


CHILD = """
import json, os, signal, sys
tmp, rank = sys.argv[1], sys.argv[2]
runs = os.path.join(tmp, f"runs-{rank}")
n = int(open(runs).read()) if os.path.exists(runs) else 0
open(runs, "w").write(str(n + 1))
with open(os.path.join(tmp, "log"), "a") as f:
    f.write(json.dumps([rank, os.environ["CUDA_VISIBLE_DEVICES"], os.environ["IMAGEBATCH_GPUS"]]) + "\\n")
if rank == "1" and n == 0:
    os.kill(os.getpid(), signal.SIGKILL)  # crash once, mid-work
"""


def test_a_crashed_child_is_released_reported_and_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = Recording(CHILD, tmp_path, ["4", "6"])
    assert sup.run() == 0
    seen = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert sorted(map(tuple, seen)) == [("0", "4", "1"), ("1", "6", "1"), ("1", "6", "1")]
    assert sup.released == ["pod-x/1"]
    assert any("crashed with signal 9" in r.getMessage() for r in caplog.records)


FAILING = """
import os, sys
tmp, rank = sys.argv[1], sys.argv[2]
log = os.environ["IMAGEBATCH_TERMINATION_LOG"]
if rank == "1":
    open(log, "w").write(os.environ["MODE"])
    sys.exit(int(os.environ["CODE"]))
"""


@pytest.mark.parametrize(
    ("mode", "code", "expected"),
    [
        (
            "spec.promptsFrom.uri: /data/p.jsonl line 3: malformed JSON",
            2,
            "spec.promptsFrom.uri: /data/p.jsonl line 3",
        ),
        (
            "RuntimeError: CUDA error",
            1,
            "RuntimeError: CUDA error\n(rank 1 (pod-x/1) crashed with exit code 1 4 times)",
        ),
    ],
)
def test_the_pod_reports_the_message_of_its_failed_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, code: int, expected: str
) -> None:
    pod_log = tmp_path / "termination-log"
    monkeypatch.setenv("IMAGEBATCH_TERMINATION_LOG", str(pod_log))
    monkeypatch.setenv("MODE", mode)
    monkeypatch.setenv("CODE", str(code))
    sup = Recording(FAILING, tmp_path, ["0", "1"])
    assert sup.run() == code
    assert pod_log.read_text().startswith(expected)


def test_sigterm_reaches_every_child(tmp_path: Path) -> None:
    script = """
import os, signal, sys, time
def term(*a):
    open(os.path.join(sys.argv[1], "term-" + sys.argv[2]), "w").close()
    sys.exit(143)
signal.signal(signal.SIGTERM, term)
open(os.path.join(sys.argv[1], "ready-" + sys.argv[2]), "w").close()
parent = os.getppid()
while os.getppid() == parent:  # ends if the supervisor is killed (a failed test)
    time.sleep(0.05)
"""
    sup = Recording(script, tmp_path, ["0", "1"])
    pid = os.fork()
    if pid == 0:  # the supervisor as its own process, so that a signal can reach it
        code = sup.run()
        os._exit(code)
    reaped = False
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{r}").exists() for r in "01"):
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.05)
        os.kill(pid, 15)
        while not reaped:  # a supervisor that did not forward the signal never ends
            assert time.monotonic() < deadline, "the supervisor did not stop its children"
            done, status = os.waitpid(pid, os.WNOHANG)
            reaped = done == pid
            time.sleep(0.05)
    finally:
        if not reaped:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == EXIT_TERMINATED
    assert all((tmp_path / f"term-{r}").exists() for r in "01")


def test_one_device_stays_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setenv("IMAGEBATCH_GPUS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    from imagebatch.worker import cluster

    monkeypatch.setattr(cluster, "run_cluster_worker", lambda ns, job, pod, **kw: calls.append(pod) or 0)
    assert multigpu.run_worker_pod("ns", "job", "pod-y") == 0
    assert calls == ["pod-y"]
