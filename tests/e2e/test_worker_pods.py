"""Worker pod problems reach the ImageBatchJob (issue 14): no pod log needed.

- A worker that crashes once: a Warning Event with its error, and the job still completes.
- A worker pod that cannot be scheduled: `WorkersHealthy=False/Unschedulable` with the scheduler's
  words and the field to change, in `kubectl get ibj` (REASON) and `describe`.
- Workers that crash at every start: the job ends `Failed/WorkersFailing` with their error,
  after a bounded number of worker Jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from harness import (
    TINY_ENV,
    Failpoints,
    Kubectl,
    Operator,
    check_output_dir,
    condition,
    ibj,
    tiny_job,
    wait_condition,
    wait_for,
)

pytestmark = pytest.mark.cluster


def events(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.json(
        "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
    )["items"]
    return items


def test_a_worker_that_crashes_once_is_reported_and_the_job_completes(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    n = 48
    fail = Failpoints(tmp_path / "failpoints")
    job = tiny_job(
        "crash-once",
        str(out),
        prompts=[f"a linocut of a fox, {i}" for i in range(n)],
        batching={"batchSize": 4, "shardSize": 12},
        # The first worker to store an image raises an unexpected error there (exit 1); its shard
        # is redone, so the job ends after the failed pod exists, however fast the machine.
        workers={"maxReplicas": 2, "shardsPerReplica": 1, "env": fail.env("image-stored@1=crash-once")},
    )
    kubectl.apply([job], namespace)
    import json as _j
    import threading

    seen = {}
    stop = threading.Event()

    def probe():
        while not stop.is_set():
            try:
                for p in kubectl.json("get", "pods", "-n", namespace)["items"]:
                    cs = p["status"].get("containerStatuses") or []
                    seen[(p["metadata"]["name"], p["status"].get("phase"))] = _j.dumps(
                        [c.get("state") for c in cs]
                    )[:300]
            except Exception:
                pass

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    wait_condition(kubectl, namespace, "crash-once", "Complete", timeout=900)
    stop.set()
    th.join()
    print("DEBUG", seen)
    check_output_dir(out, {f"p{i:07d}" for i in range(n)})
    warnings = [e for e in events(kubectl, namespace, "crash-once") if e.get("reason") == "WorkerFailed"]
    pods = kubectl.json("get", "pods", "-n", namespace)["items"]
    assert warnings, (
        [(e.get("reason"), e.get("message")) for e in events(kubectl, namespace, "crash-once")],
        [
            (p["metadata"]["name"], p["status"].get("phase"), p["status"].get("containerStatuses"))
            for p in pods
        ],
    )
    assert (
        "failed with exit code 1: RuntimeError: failpoint image-stored@1: crash-once"
        in warnings[0]["message"]
    )
    assert warnings[0]["type"] == "Warning"
    described = kubectl("describe", "ibj", "crash-once", "-n", namespace).stdout
    assert "RuntimeError: failpoint image-stored@1: crash-once" in described


def test_an_unschedulable_worker_pod_is_named_with_what_to_change(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    job = tiny_job(
        "nowhere",
        str(tmp_path / "out"),
        prompts=["a map of nowhere"],
        workers={"maxReplicas": 1, "nodeSelector": {"imagebatch.dev/no-such-node": "true"}, "env": TINY_ENV},
    )
    kubectl.apply([job], namespace)

    def unschedulable() -> dict[str, Any] | None:
        status = ibj(kubectl, namespace, "nowhere").get("status") or {}
        return status if status.get("reason") == "Unschedulable" else None

    status = wait_for("the job to say Unschedulable", unschedulable, timeout=600)
    healthy = condition({"status": status}, "WorkersHealthy")
    assert healthy is not None and healthy["status"] == "False", status
    assert "cannot be scheduled" in healthy["message"] and "spec.workers.nodeSelector" in healthy["message"]
    assert "node affinity/selector" in healthy["message"]  # the scheduler's own words
    row = kubectl("get", "ibj", "nowhere", "-n", namespace).stdout.splitlines()[1].split()
    assert row[1:3] == ["Running", "Unschedulable"], row
    wide = kubectl("get", "ibj", "nowhere", "-n", namespace, "-o", "wide").stdout
    assert "spec.workers.nodeSelector" in wide
    reasons = [e.get("reason") for e in events(kubectl, namespace, "nowhere") if e.get("type") == "Warning"]
    assert "Unschedulable" in reasons


def test_workers_that_crash_at_every_start_fail_the_job_with_their_error(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    # A broken setting in the workers' environment: every worker process dies at start with an
    # error that is not an ImageBatchError (a ValueError), as a bug would.
    env = [*TINY_ENV, {"name": "IMAGEBATCH_FAILPOINTS", "value": "no-such-point=boom"}]
    job = tiny_job(
        "crashloop",
        str(tmp_path / "out"),
        prompts=["a broken clock"],
        retries={"maxAttempts": 1},
        workers={"maxReplicas": 1, "env": env},
    )
    kubectl.apply([job], namespace)
    wait_condition(kubectl, namespace, "crashloop", "Failed", timeout=1200)
    failed = condition(ibj(kubectl, namespace, "crashloop"), "Failed")
    assert failed is not None and failed["reason"] == "WorkersFailing", failed
    assert "IMAGEBATCH_FAILPOINTS: cannot read 'no-such-point=boom'" in failed["message"], failed
    # Bounded: the first worker Job and two replacements, then no more.
    made = [
        e
        for e in events(kubectl, namespace, "crashloop")
        if e.get("reason") == "ScaledUp" and e["message"].startswith("started worker Job")
    ]
    assert len(made) == 3, [e.get("message") for e in made]
    status = ibj(kubectl, namespace, "crashloop")["status"]
    assert status["state"] == "Failed" and status["reason"] == "WorkersFailing"
