"""Acceptance (6): suspend scales the workers to 0 and keeps the progress; resume finishes the job.
Also: ttlSecondsAfterFinished deletes the finished job, and its shards with it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Kubectl, Operator, check_output_dir, condition, ibj, tiny_job, wait_condition, wait_for

pytestmark = pytest.mark.cluster


def test_suspend_then_resume(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    n = 600
    job = tiny_job(
        "pause",
        str(out),
        prompts=[f"a landscape painting, variation {i}" for i in range(n)],
        generation={"steps": 20},
        batching={"batchSize": 8, "shardSize": 50},
        workers={"maxReplicas": 2, "shardsPerReplica": 1},
        ttlSecondsAfterFinished=3,
    )
    kubectl.apply([job], namespace)

    def done() -> int:
        status = ibj(kubectl, namespace, "pause").get("status") or {}
        return int((status.get("items") or {}).get("done", 0))

    wait_for("some images", lambda: done() >= 50, timeout=180)
    kubectl(
        "patch",
        "ibj",
        "pause",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"suspend": True}}),
    )
    wait_condition(kubectl, namespace, "pause", "Suspended", timeout=60)

    def live_pods() -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = kubectl.json("get", "pods", "-n", namespace)["items"]
        return [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]

    wait_for("workers gone", lambda: not live_pods(), timeout=60)
    parallelism = kubectl(
        "get", "job", "pause-workers", "-n", namespace, "-o", "jsonpath={.spec.parallelism}"
    )
    assert parallelism.stdout == "0"
    # Released claims: nothing stays Claimed by a worker that is gone, and the status says so.
    wait_for(
        "claims released",
        lambda: all(
            (s.get("status") or {}).get("state") != "Claimed"
            for s in kubectl.json("get", "ibs", "-n", namespace)["items"]
        ),
        timeout=30,
    )

    def settled() -> bool:
        status = ibj(kubectl, namespace, "pause").get("status") or {}
        return status.get("shards", {}).get("claimed") == 0 and status.get("activeReplicas") == 0

    wait_for("the status to show no claims and no workers", settled, timeout=30)
    paused_at = done()
    assert paused_at < n
    time.sleep(4)
    assert done() == paused_at and not live_pods()

    kubectl(
        "patch",
        "ibj",
        "pause",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"suspend": False}}),
    )
    wait_condition(kubectl, namespace, "pause", "Complete", timeout=300)
    job_now = ibj(kubectl, namespace, "pause")
    suspended = condition(job_now, "Suspended")
    assert suspended is not None and suspended["status"] == "False"
    check_output_dir(out, {f"p{i:07d}" for i in range(n)})

    # ttlSecondsAfterFinished: 3 → the job goes, and its shards, Job and RBAC with it (owner references).
    wait_for(
        "the finished job deleted",
        lambda: kubectl("get", "ibj", "pause", "-n", namespace, check=False).returncode != 0,
        timeout=60,
    )
    wait_for(
        "its shards deleted",
        lambda: not kubectl.json("get", "ibs", "-n", namespace)["items"],
        timeout=60,
    )
