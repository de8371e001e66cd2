"""What is wrong with a job's worker pods, in words a user can act on. Pure.

The kubelet, the scheduler and the Job controller each know why a worker does not run; the user
reads `kubectl get ibj` and `kubectl describe ibj`. This turns pod status into one problem for the
`WorkersHealthy` condition and a report per failed pod for a Warning Event, with the worker's own
fatal error (its termination message) where it wrote one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from imagebatch.names import EXIT_TERMINATED
from imagebatch.operator.conditions import WorkerProblem
from imagebatch.reasons import Reason

JSON = dict[str, Any]

PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")
CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError")


@dataclass(frozen=True)
class PodFailure:
    pod: str
    uid: str
    container: str
    exit_code: int | None
    reason: str  # the kubelet's: Error, OOMKilled, ...
    message: str  # the container's termination message (the worker's fatal error), may be ""
    finished_at: str = ""  # RFC 3339, as the kubelet wrote it

    def describe(self) -> str:
        code = f"exit code {self.exit_code}" if self.exit_code is not None else self.reason
        text = f"worker pod {self.pod} ({self.container}) failed with {code}"
        if self.reason == "OOMKilled":
            text = f"worker pod {self.pod} ({self.container}) was OOMKilled"
        return f"{text}: {self.message.strip()}" if self.message.strip() else text


def _statuses(pod: JSON) -> list[JSON]:
    st = pod.get("status") or {}
    return list(st.get("initContainerStatuses") or []) + list(st.get("containerStatuses") or [])


def _terminated(cs: JSON) -> JSON | None:
    for key in ("state", "lastState"):
        t = (cs.get(key) or {}).get("terminated")
        if t:
            return dict(t)
    return None


def failures(pods: Iterable[JSON]) -> list[PodFailure]:
    """Containers of worker pods that ended in error (a release on SIGTERM, exit 143, is not one)."""
    out: list[PodFailure] = []
    for pod in pods:
        meta = pod["metadata"]
        for cs in _statuses(pod):
            t = _terminated(cs)
            if t is None:
                continue
            code = t.get("exitCode")
            if code in (0, EXIT_TERMINATED) and t.get("reason") != "OOMKilled":
                continue
            out.append(
                PodFailure(
                    pod=str(meta["name"]),
                    uid=str(meta.get("uid") or meta["name"]),
                    container=str(cs.get("name") or ""),
                    exit_code=int(code) if code is not None else None,
                    reason=str(t.get("reason") or "Error"),
                    message=str(t.get("message") or ""),
                    finished_at=str(t.get("finishedAt") or ""),
                )
            )
    return out


def _memory_limit(pod: JSON, container: str) -> str | None:
    spec = pod.get("spec") or {}
    for c in list(spec.get("initContainers") or []) + list(spec.get("containers") or []):
        if c.get("name") == container:
            limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
            return None if limit is None else str(limit)
    return None


def problem(pods: Iterable[JSON]) -> WorkerProblem | None:
    """The most telling problem of the live and failed worker pods, or None when they are fine."""
    pods = list(pods)
    for pod in pods:
        name = pod["metadata"]["name"]
        for cs in _statuses(pod):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            why = waiting.get("reason")
            if why in PULL_REASONS:
                image = cs.get("image") or "the worker image"
                return WorkerProblem(
                    Reason.IMAGE_PULL_BACK_OFF,
                    f"worker pod {name} cannot pull {image} ({why}: {waiting.get('message') or 'no detail'}); "
                    "check spec.workers.image and the registry's pull secret",
                )
            if why in CONFIG_REASONS:
                return WorkerProblem(
                    Reason.WORKER_CRASHED,
                    f"worker pod {name} cannot start its container ({why}: {waiting.get('message') or ''}); "
                    "check the Secrets and ConfigMaps that spec.workers.env and spec.output.credentialsSecret name",
                )
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                return WorkerProblem(
                    Reason.UNSCHEDULABLE,
                    f"worker pod {pod['metadata']['name']} cannot be scheduled: {cond.get('message') or ''} "
                    "Check spec.workers.nodeSelector, tolerations and resources (nvidia.com/gpu) "
                    "against the cluster's nodes.",
                )
    # A failure that a worker started since has outlived is history (its Warning Event stays).
    started = [
        str(((cs.get("state") or {}).get("running") or {}).get("startedAt") or "")
        for pod in pods
        for cs in _statuses(pod)
    ]
    latest_start = max(started, default="")
    failed = [f for f in failures(pods) if f.finished_at >= latest_start or not f.finished_at]
    oom = [f for f in failed if f.reason == "OOMKilled"]
    if oom:
        f = oom[-1]
        pod = next(p for p in pods if p["metadata"]["name"] == f.pod)
        limit = _memory_limit(pod, f.container)
        at = f"at its memory limit {limit}" if limit else "without a memory limit (the node ran out)"
        return WorkerProblem(
            Reason.OOM_KILLED,
            f"worker pod {f.pod} was OOMKilled {at}; raise spec.workers.resources.limits.memory "
            "or lower spec.batching.batchSize",
        )
    if failed:
        last = failed[-1]
        count = len({f.pod for f in failed})
        lead = f"{count} worker pods failed; last: " if count > 1 else ""
        return WorkerProblem(Reason.WORKER_CRASHED, lead + last.describe())
    return None
