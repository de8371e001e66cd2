"""Attempts count failures, not claims; a renewed lease is not progress (issue 9).

- A worker SIGTERMed mid-shard three times (suspend/resume) with `maxAttempts: 2`, then killed
  once, still completes: a release on SIGTERM uses no attempt, so the one real failure is the
  shard's first (when claims counted, the fourth claim's failure failed the job).
- A worker whose engine hangs while its lease thread renews loses the claim at
  `retries.progressDeadlineSeconds` and the job completes through another worker.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from harness import (
    Failpoints,
    Kubectl,
    Operator,
    check_output_dir,
    ibj,
    live_pods,
    shards,
    tiny_job,
    wait_condition,
    wait_for,
    worker_pids,
)

from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster


def set_suspend(kubectl: Kubectl, namespace: str, name: str, value: bool) -> None:
    kubectl(
        "patch", "ibj", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": {"suspend": value}})
    )


def test_three_sigterms_and_a_crash_with_max_attempts_two_still_complete(
    kube_cluster: TestCluster, kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    if kube_cluster.local is None:
        pytest.skip("needs the local node agent to kill a worker process")
    out = tmp_path / "out"
    n = 40
    # One shard, one worker; every worker process holds at its first stored image until SIGTERM,
    # so each suspension catches the shard claimed and half made, however fast the machine.
    fail = Failpoints(tmp_path / "failpoints")
    job = tiny_job(
        "sigterms",
        str(out),
        prompts=[f"a watercolor of a harbour, {i}" for i in range(n)],
        batching={"batchSize": 4, "shardSize": n},
        retries={"maxAttempts": 2},
        workers={"maxReplicas": 1, "env": fail.env("image-stored@1=hold")},
    )
    kubectl.apply([job], namespace)
    for cycle in range(1, 4):
        wait_for(
            f"worker {cycle} holding mid-shard", lambda c=cycle: len(fail.marks("image-stored")) >= c, 600
        )
        set_suspend(kubectl, namespace, "sigterms", True)
        wait_condition(kubectl, namespace, "sigterms", "Suspended", timeout=300)
        wait_for("workers gone", lambda: not live_pods(kubectl, namespace), timeout=300)
        (shard,) = shards(kubectl, namespace)
        st = shard["status"]
        assert st["state"] == "Pending" and st.get("failures", 0) == 0, st  # released, no attempt used
        assert st["attempt"] == cycle
        set_suspend(kubectl, namespace, "sigterms", False)
    # The fourth worker holds mid-shard too: kill it (a crash, not a release).
    mark = wait_for("worker 4 holding mid-shard", lambda: fail.marks("image-stored")[3:], 600)[0]
    pids = worker_pids(kube_cluster.local.pod_processes(), mark["pod"])
    assert mark["pid"] in pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    def failed_once() -> dict[str, Any] | None:
        (shard,) = shards(kubectl, namespace)
        return shard["status"] if shard["status"].get("failures", 0) == 1 else None

    st = wait_for("the crash counted as the shard's first failure", failed_once, timeout=600)
    assert st["state"] in ("Pending", "Claimed"), st  # retried, not Failed
    wait_for("worker 5 holding mid-shard", lambda: fail.marks("image-stored")[4:], 600)
    fail.release()  # the fifth worker makes the whole shard
    wait_condition(kubectl, namespace, "sigterms", "Complete", timeout=900)
    (shard,) = shards(kubectl, namespace)
    assert shard["status"]["state"] == "Done" and shard["status"]["attempt"] == 5
    assert shard["status"]["failures"] == 1
    check_output_dir(out, {f"p{i:07d}" for i in range(n)})


def test_a_hung_engine_with_a_renewed_lease_loses_its_claim_at_the_progress_deadline(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    n = 120
    fail = Failpoints(tmp_path / "failpoints")
    job = tiny_job(
        "hung",
        str(out),
        prompts=[f"a pencil sketch of a bridge, {i}" for i in range(n)],
        batching={"batchSize": 4, "shardSize": 40},
        # The lease is renewed every few seconds by the hung worker's lease thread; only the
        # progress deadline can take its shard back. Generous attempts: a slow machine's slow
        # batch may also meet the deadline once, which must not fail the job.
        retries={"leaseSeconds": 10, "progressDeadlineSeconds": 20, "maxAttempts": 5},
        workers={"maxReplicas": 2, "shardsPerReplica": 1, "env": fail.env("image-stored@1=hold-once")},
    )
    kubectl.apply([job], namespace)
    mark = fail.wait("image-stored")  # the first worker's engine hangs here; its lease goes on
    hung_pod, hung_shard = mark["pod"], mark["shard"]

    def taken_back() -> dict[str, Any] | None:
        st = next(s for s in shards(kubectl, namespace) if s["metadata"]["name"] == hung_shard)["status"]
        return st if st.get("holder") != hung_pod and st.get("failures", 0) >= 1 else None

    wait_for("the hung worker's shard taken back", taken_back, timeout=600, interval=0.5)
    wait_condition(kubectl, namespace, "hung", "Complete", timeout=900)
    final = next(s for s in shards(kubectl, namespace) if s["metadata"]["name"] == hung_shard)["status"]
    assert final["state"] == "Done" and final["holder"] != hung_pod
    check_output_dir(out, {f"p{i:07d}" for i in range(n)})
    # Why it was taken back is in the Event (the shard's error is cleared once it is Done, so a
    # sample of the shard may come too late to read it).
    events = kubectl.json("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=hung")
    deadline = [e for e in events["items"] if e.get("reason") == "ProgressDeadlineExceeded"]
    # (On a slow machine another shard's slow batch may meet the deadline too: look for this one.)
    why = f"shard {hung_shard}: worker {hung_pod} made no progress"
    assert any(why in e["message"] for e in deadline), [e["message"] for e in deadline]
    # The hung pod was alive the whole time (its lease renewed): not a HolderGone or LeaseExpired.
    status = ibj(kubectl, namespace, "hung")["status"]
    assert status["state"] == "Complete" and status["items"]["done"] == n
