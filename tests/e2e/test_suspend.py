"""Acceptance (6): suspend scales the workers to 0 and keeps the progress; resume finishes the job.
Also: ttlSecondsAfterFinished deletes the finished job, and its shards with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import (
    Failpoints,
    Kubectl,
    Operator,
    check_output_dir,
    condition,
    ibj,
    live_pods,
    tiny_job,
    wait_condition,
    wait_for,
)

pytestmark = pytest.mark.cluster


def test_suspend_then_resume(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    n = 600
    # Each worker holds after its first shard until it is stopped: the job is suspended in the
    # middle (50 to 100 images done), however fast the machine.
    fail = Failpoints(tmp_path / "failpoints")
    job = tiny_job(
        "pause",
        str(out),
        prompts=[f"a landscape painting, variation {i}" for i in range(n)],
        generation={"steps": 20},
        batching={"batchSize": 8, "shardSize": 50},
        workers={"maxReplicas": 2, "shardsPerReplica": 1, "env": fail.env("shard-done@1=hold")},
        ttlSecondsAfterFinished=3,
    )
    kubectl.apply([job], namespace)

    def done() -> int:
        status = ibj(kubectl, namespace, "pause").get("status") or {}
        return int((status.get("items") or {}).get("done", 0))

    fail.wait("shard-done")
    wait_for("some images", lambda: done() >= 50, timeout=300)
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
    wait_condition(kubectl, namespace, "pause", "Suspended", timeout=300)

    wait_for("workers gone", lambda: not live_pods(kubectl, namespace), timeout=300)

    def parallelism_now() -> str:
        return kubectl(
            "get", "job", "pause-workers", "-n", namespace, "-o", "jsonpath={.spec.parallelism}"
        ).stdout

    assert parallelism_now() == "0"
    # Released claims: nothing stays Claimed by a worker that is gone, and the status says so.
    wait_for(
        "claims released",
        lambda: all(
            (s.get("status") or {}).get("state") != "Claimed"
            for s in kubectl.json("get", "ibs", "-n", namespace)["items"]
        ),
        timeout=300,
    )

    def settled() -> bool:
        status = ibj(kubectl, namespace, "pause").get("status") or {}
        return status.get("shards", {}).get("claimed") == 0 and status.get("activeReplicas") == 0

    wait_for("the status to show no claims and no workers", settled, timeout=300)
    paused_at = done()
    assert 50 <= paused_at <= 100, paused_at
    # Suspended stays suspended: after more passes of the operator, nothing moved.
    running_operator.wait_passes(namespace, "pause")
    assert done() == paused_at and not live_pods(kubectl, namespace)
    assert parallelism_now() == "0"

    fail.release()  # the workers of the resumed job run through

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
    wait_condition(kubectl, namespace, "pause", "Complete", timeout=900)
    job_now = ibj(kubectl, namespace, "pause")
    suspended = condition(job_now, "Suspended")
    assert suspended is not None and suspended["status"] == "False"
    check_output_dir(out, {f"p{i:07d}" for i in range(n)})

    # ttlSecondsAfterFinished: 3 → the job goes, and its shards, Job and RBAC with it (owner references).
    wait_for(
        "the finished job deleted",
        lambda: kubectl("get", "ibj", "pause", "-n", namespace, check=False).returncode != 0,
        timeout=300,
    )
    wait_for(
        "its shards deleted",
        lambda: not kubectl.json("get", "ibs", "-n", namespace)["items"],
        timeout=300,
    )
