"""The local cluster's processes: ports, liveness (pid + start time, never a reused pid), stopping.

Shared by cluster.py (the control plane) and its tests; no Kubernetes knowledge here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imagebatch_testing.kubeapi import ApiError


class ClusterError(RuntimeError):
    """The cluster could not be built, started or stopped."""


@dataclass
class ProcessRecord:
    name: str
    pid: int
    start_time: int
    log: str


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_start_time(pid: int) -> int | None:
    """The start time of a live process (clock ticks since boot); None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return None
    return int(fields[19])


def process_alive(pid: int, start_time: int) -> bool:
    """Whether `pid` still is the process that started at `start_time` (not a reused pid)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and has exited
    return process_start_time(pid) == start_time


def stop_process_group(pid: int, start_time: int, grace: float = 10.0) -> None:
    """SIGTERM to the process group led by `pid` (a session leader we started), then SIGKILL."""
    if not process_alive(pid, start_time):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # children left behind by a dead leader
        return
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and process_alive(pid, start_time):
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and process_alive(pid, start_time):
        time.sleep(0.05)


@contextlib.contextmanager
def paused(record: ProcessRecord) -> Iterator[ProcessRecord]:
    """The process stopped (SIGSTOP: a frozen API server, say) while the block runs, and resumed
    (SIGCONT) when it ends, whatever happens in it."""
    if not process_alive(record.pid, record.start_time):
        raise ClusterError(f"{record.name} (pid {record.pid}) is not running")
    os.kill(record.pid, signal.SIGSTOP)
    try:
        yield record
    finally:
        os.kill(record.pid, signal.SIGCONT)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:])


def ssl_insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def http_ok(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError, ssl.SSLError):
        return False


def wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, ApiError):
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def spawn(
    name: str, argv: list[str], log_dir: Path, cwd: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Starts `argv` in its own process group (so stopping it stops all of it), logging to
    log_dir/<name>.log; the record names it by pid and start time."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    start_time = None
    for _ in range(100):
        start_time = process_start_time(proc.pid)
        if start_time is not None:
            break
        time.sleep(0.01)  # /proc/<pid> appears just after fork
    if start_time is None:
        raise ClusterError(f"{name} exited at once:\n{tail(log_path)}")
    (log_dir / f"{name}.cmd").write_text(" ".join(argv) + "\n")
    return proc, ProcessRecord(name, proc.pid, start_time, str(log_path))


def wait_healthy(record: ProcessRecord, url: str, timeout: float) -> None:
    """Waits for `url` to answer 200 while the process lives; its log tail in every error."""
    ctx = ssl_insecure() if url.startswith("https") else None

    def check() -> bool:
        if not process_alive(record.pid, record.start_time):
            raise ClusterError(f"{record.name} exited; log tail:\n{tail(Path(record.log))}")
        return http_ok(url, ctx)

    try:
        wait_until(f"{record.name} at {url}", check, timeout)
    except ClusterError as err:
        if "exited" in str(err):
            raise
        raise ClusterError(f"{err}; log tail of {record.name}:\n{tail(Path(record.log))}") from None
