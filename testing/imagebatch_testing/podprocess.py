"""A container as a local process: its state as the API reports it, start, exit and stop."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSON = dict[str, Any]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    """One container of a pod and its current process."""

    spec: JSON
    init: bool = False
    proc: subprocess.Popen[bytes] | None = None
    proc_start: int = 0
    started_at: str = ""
    restart_count: int = 0
    state: JSON = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: JSON = field(default_factory=dict)
    not_before: float = 0.0  # restart back-off
    done: bool = False  # terminated for good (no restart coming)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited_ok(self) -> bool:
        return bool(self.state.get("terminated", {}).get("exitCode", 1) == 0)

    def status(self) -> JSON:
        running = "running" in self.state
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "containerID": f"imagebatch://{self.proc.pid}" if self.proc else "",
            "ready": running,
            "started": running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }

    def back_off(self, delay: float, message: str | None = None) -> None:
        """Exited, to be restarted after `delay` seconds (CrashLoopBackOff)."""
        self.not_before = time.monotonic() + delay
        self.last_state = self.state
        waiting: JSON = {"reason": "CrashLoopBackOff"}
        if message:
            waiting["message"] = message
        self.state = {"waiting": waiting}
        self.restart_count += 1
        self.proc = None


def process_start_time(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def exit_code(code: int) -> int:
    """Popen's return code as Kubernetes reports it: 128 + the signal for a killed process."""
    return 128 - code if code < 0 else code


def terminated_state(code: int, started_at: str, pid: int) -> JSON:
    value = exit_code(code)
    terminated: JSON = {
        "exitCode": value,
        "reason": "Completed" if value == 0 else "Error",
        "startedAt": started_at,
        "finishedAt": now(),
        "containerID": f"imagebatch://{pid}",
    }
    if code < 0:
        terminated["signal"] = -code
    return {"terminated": terminated}


# The kubelet's limits (pkg/kubelet/container: MaxContainerTerminationMessage*): the message file's
# last 4096 bytes; with FallbackToLogsOnError and an empty file, the log's last 80 lines, 2048 bytes.
MAX_MESSAGE_BYTES = 4096
MAX_LOG_MESSAGE_BYTES = 2048
MAX_LOG_MESSAGE_LINES = 80
# How a container finds its termination message file on this node, which cannot mount a file at
# its terminationMessagePath (/dev/termination-log): the worker writes where this names.
TERMINATION_LOG_ENV = "IMAGEBATCH_TERMINATION_LOG"


def log_tail(log_path: Path) -> str:
    try:
        data = log_path.read_bytes()
    except OSError:
        return ""
    lines = data.splitlines(keepends=True)[-MAX_LOG_MESSAGE_LINES:]
    return b"".join(lines)[-MAX_LOG_MESSAGE_BYTES:].decode(errors="replace")


def termination_message(spec: JSON, message_file: Path, log_path: Path, code: int) -> str:
    """`state.terminated.message` as the kubelet reads it for a container that exited with `code`."""
    if not spec.get("terminationMessagePath"):
        return ""
    try:
        data = message_file.read_bytes()[-MAX_MESSAGE_BYTES:]
    except OSError:
        data = b""
    if data:
        return data.decode(errors="replace")
    if spec.get("terminationMessagePolicy") == "FallbackToLogsOnError" and exit_code(code) != 0:
        return log_tail(log_path)
    return ""


def start_error_state(err: OSError) -> JSON:
    return {
        "terminated": {
            "exitCode": 128,
            "reason": "StartError",
            "message": str(err),
            "startedAt": now(),
            "finishedAt": now(),
        }
    }


def spawn(argv: list[str], env: dict[str, str], cwd: str, log_path: Path) -> subprocess.Popen[bytes]:
    """Starts a container's process in its own session (so a signal reaches its children too)."""
    with open(log_path, "ab") as out:
        try:
            return subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as err:
            out.write(f"[nodeagent] cannot start {argv!r}: {err}\n".encode())
            raise


def stop(containers: list[Container], grace: float, on_exit: Callable[[Container, int], None]) -> None:
    """SIGTERM to every running container's process group, then SIGKILL after `grace`."""
    running = [c for c in containers if c.running()]
    for c in running:
        assert c.proc is not None
        with contextlib.suppress(OSError):
            os.killpg(c.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(c.running() for c in running):
        time.sleep(0.05)
    for c in running:
        assert c.proc is not None
        with contextlib.suppress(OSError):
            os.killpg(c.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(timeout=5)
        on_exit(c, c.proc.returncode if c.proc.returncode is not None else -9)
        c.done = True
