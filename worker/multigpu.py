"""One engine process per GPU of a worker pod.

A pod given N GPUs (`workers.gpusPerWorker`) runs N children, each pinned to one device by
CUDA_VISIBLE_DEVICES, each a claimer of its own with the identity `<pod>/<rank>` (its own claims
and leases; the operator maps a holder back to its pod by the part before the slash). The
supervisor, the pod's main process, forwards SIGTERM to every child. A child that crashes (a
signal it did not get from us, or an unexpected exit code) has its claims released at once, is
reported in the pod's log and is started again, up to MAX_RESTARTS times; the pod's exit code
tells the Job what happened (a user or model error of any child fails the job as with one process).

With 0 or 1 GPU the worker stays one process: `run_worker_pod` calls the cluster worker itself.
On a machine with no CUDA the same code path runs: each child gets its own CUDA_VISIBLE_DEVICES
entry and runs on the CPU, which is how the tests exercise it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType

from imagebatch.holders import rank_holder
from imagebatch.names import EXIT_MODEL_LOAD_ERROR, EXIT_TERMINATED, EXIT_USER_ERROR
from imagebatch.worker import termination

log = logging.getLogger(__name__)

# gpusPerWorker, set on the worker container by the operator (operator/builders.py).
GPUS_ENV = "IMAGEBATCH_GPUS"
MAX_RESTARTS = 3
FATAL = (EXIT_USER_ERROR, EXIT_MODEL_LOAD_ERROR)


def visible_devices(env: Mapping[str, str]) -> list[str]:
    """The pod's devices: CUDA_VISIBLE_DEVICES if set, else 0..gpusPerWorker-1.

    The NVIDIA device plugin exposes a pod's GPUs as ordinals 0..N-1 of the container, so the
    requested count names them; an explicit CUDA_VISIBLE_DEVICES (set by the user) wins."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd:
        return [d.strip() for d in cvd.split(",") if d.strip()]
    try:
        n = int(env.get(GPUS_ENV, "0") or 0)
    except ValueError:
        n = 0
    return [str(i) for i in range(n)]


def child_env(env: Mapping[str, str], device: str, termination_log: str | None = None) -> dict[str, str]:
    # One GPU per child: it never supervises again, and sees only its own device (as cuda:0).
    out = {**env, "CUDA_VISIBLE_DEVICES": device, GPUS_ENV: "1"}
    if termination_log:
        # Each child its own file: the supervisor writes the pod's message from the one that failed.
        out[termination.ENV_VAR] = termination_log
    return out


def pod_message(code: int, failures: Mapping[int, tuple[int, str]], pod: str) -> str:
    """The pod's termination message for exit code `code`, from its ranks' (rank: (last exit
    code, termination message)); '' when the pod did not fail. A user or model error is the
    child's message as it is (every rank fails alike); a crash says which rank and how."""
    if code in (0, EXIT_TERMINATED):
        return ""
    for rank, (child_code, msg) in sorted(failures.items()):
        if code in FATAL and child_code == code:
            return msg or f"rank {rank} ({rank_holder(pod, rank)}) exited with {code}"
    for rank, (child_code, msg) in sorted(failures.items()):
        if child_code not in (0, EXIT_TERMINATED):
            how = f"signal {-child_code}" if child_code < 0 else f"exit code {child_code}"
            where = f"rank {rank} ({rank_holder(pod, rank)}) crashed with {how} {MAX_RESTARTS + 1} times"
            return f"{msg}\n({where})" if msg else where
    return ""


def pod_exit_code(codes: list[int], terminated: bool) -> int:
    """The pod's exit code from its children's last exit codes (negative: killed by a signal)."""
    for fatal in FATAL:
        if fatal in codes:
            return fatal
    if terminated:
        return EXIT_TERMINATED
    if all(c == 0 for c in codes):
        return 0
    return 1


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If the supervisor is SIGKILLed, its children must not go on holding GPUs and claims.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    rank: int
    device: str
    proc: subprocess.Popen[bytes]
    restarts: int = 0


class Supervisor:
    def __init__(self, namespace: str, job: str, pod: str, devices: list[str], metrics_port: int = 0) -> None:
        self.namespace = namespace
        self.job = job
        self.pod = pod
        self.devices = devices
        self.metrics_port = metrics_port
        self.terminated = False
        self.children: dict[int, Child] = {}  # by pid
        self.messages = tempfile.mkdtemp(prefix="imagebatch-ranks-")

    def argv(self, rank: int) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "imagebatch.cli",
            "worker",
            "--namespace",
            self.namespace,
            "--job",
            self.job,
            "--pod",
            self.pod,
            "--rank",
            str(rank),
        ]
        if self.metrics_port:
            args += ["--metrics-port", str(self.metrics_port + rank)]
        return args

    def start(self, rank: int, restarts: int = 0) -> None:
        device = self.devices[rank]
        log_file = self.message_file(rank)
        with contextlib.suppress(FileNotFoundError):
            os.remove(log_file)  # a restarted child's message is its own
        proc = subprocess.Popen(self.argv(rank), env=child_env(os.environ, device, log_file))
        self.children[proc.pid] = Child(rank, device, proc, restarts)
        log.info(
            "rank %d: pid %d on CUDA_VISIBLE_DEVICES=%s as %s",
            rank,
            proc.pid,
            device,
            rank_holder(self.pod, rank),
        )

    def message_file(self, rank: int) -> str:
        return os.path.join(self.messages, f"rank-{rank}")

    def on_term(self, signum: int, frame: FrameType | None) -> None:
        self.terminated = True
        for child in self.children.values():
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)

    def release_claims(self, holder: str) -> int:
        """Back to Pending, as the operator does for a gone pod: the holder is dead, no one else writes as it."""
        from imagebatch import shardstate
        from imagebatch.worker.kube import WorkerKube

        kube = WorkerKube(self.namespace, self.job)
        uid = str(kube.get_job()["metadata"]["uid"])
        n = 0
        for shard in kube.list_shards(uid):
            st = shardstate.shard_status(shard)
            if st.state == "Claimed" and st.holder == holder:
                why = f"worker {holder} crashed (attempt {st.attempt})"
                n += (
                    kube.replace_shard_status(shard, shardstate.dump(shardstate.released(st, why)))
                    is not None
                )
        return n

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        for rank in range(len(self.devices)):
            self.start(rank)
        last: dict[int, int] = {}
        while self.children:
            try:
                pid, status = os.wait()
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                # Popen.send_signal polls before it signals (on_term), so a child that ended just
                # then was reaped there and os.wait has none left: its code is on its Popen.
                pid = next((p for p, c in self.children.items() if c.proc.returncode is not None), 0)
                if not pid:
                    break
                code = int(self.children[pid].proc.returncode or 0)
            child = self.children.pop(pid, None)
            if child is None:
                continue
            child.proc.returncode = code
            last[child.rank] = code
            who = rank_holder(self.pod, child.rank)
            if code in (0, EXIT_TERMINATED) or code in FATAL or self.terminated:
                log.info("rank %d (%s) exited with %d", child.rank, who, code)
                if code in FATAL:
                    self.on_term(signal.SIGTERM, None)  # every rank would fail alike
                continue
            released = 0
            try:
                released = self.release_claims(who)
            except Exception as e:  # the lease then expires and the operator requeues the shard
                log.warning("cannot release the claims of %s: %s", who, e)
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.error(
                "rank %d (%s, CUDA_VISIBLE_DEVICES=%s) crashed with %s; released %d claim(s)%s",
                child.rank,
                who,
                child.device,
                how,
                released,
                "; starting it again" if child.restarts < MAX_RESTARTS else "; not starting it again",
            )
            if child.restarts < MAX_RESTARTS:
                self.start(child.rank, child.restarts + 1)
        code = pod_exit_code(list(last.values()), self.terminated)
        failures = {r: (c, termination.read(self.message_file(r))) for r, c in last.items()}
        message = pod_message(code, failures, self.pod)
        if message:
            termination.write(message)
        return code


def run_worker_pod(namespace: str, job: str, pod: str, device: str = "auto", metrics_port: int = 0) -> int:
    """The worker pod's main process: one engine process per visible device."""
    devices = visible_devices(os.environ)
    if len(devices) <= 1:
        from imagebatch.worker.cluster import run_cluster_worker

        return run_cluster_worker(namespace, job, pod, device=device, metrics_port=metrics_port)
    log.info("%d devices (%s): one engine process each", len(devices), ",".join(devices))
    return Supervisor(namespace, job, pod, devices, metrics_port).run()


def run_rank(
    namespace: str, job: str, pod: str, rank: int, device: str = "auto", metrics_port: int = 0
) -> int:
    """One child: the cluster worker as `<pod>/<rank>`, naming its rank and device in the manifest."""
    from imagebatch.worker.cluster import run_cluster_worker

    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the supervisor died before the line above
        return EXIT_TERMINATED
    labels = {"rank": rank, "visible_device": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    return run_cluster_worker(
        namespace, job, rank_holder(pod, rank), device=device, metrics_port=metrics_port, labels=labels
    )
