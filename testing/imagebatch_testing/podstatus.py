"""A pod's status as a kubelet reports it: phase, conditions, container statuses. Pure."""

from __future__ import annotations

import json
from typing import Any

from imagebatch_testing.podprocess import Container

JSON = dict[str, Any]


def condition(kind: str, ok: bool, ts: str, reason: str = "") -> JSON:
    cond: JSON = {
        "type": kind,
        "status": "True" if ok else "False",
        "lastProbeTime": None,
        "lastTransitionTime": ts,
    }
    if reason and not ok:
        cond["reason"] = reason
    return cond


def pod_status(
    phase: str,
    reason: str,
    start_time: str,
    containers: list[Container],
    init_containers: list[Container],
    ts: str,
) -> JSON:
    init_done = all(c.done and c.state.get("terminated", {}).get("exitCode") == 0 for c in init_containers)
    running = phase == "Running" and all("running" in c.state for c in containers)
    terminal = phase in ("Succeeded", "Failed")
    ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
    status: JSON = {
        "phase": phase,
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "startTime": start_time,
        "conditions": [
            condition("PodReadyToStartContainers", True, ts),
            condition("Initialized", init_done or terminal, ts, "ContainersNotInitialized"),
            condition("ContainersReady", running, ts, ready_reason),
            condition("Ready", running, ts, ready_reason),
        ],
        "containerStatuses": [c.status() for c in containers],
    }
    if init_containers:
        status["initContainerStatuses"] = [c.status() for c in init_containers]
    if reason:
        status["reason"] = reason
    return status


def status_key(status: JSON) -> str:
    """The status without its timestamps: equal keys mean nothing to report."""
    conditions = [{**c, "lastTransitionTime": ""} for c in status["conditions"]]
    return json.dumps({**status, "conditions": conditions}, sort_keys=True)
