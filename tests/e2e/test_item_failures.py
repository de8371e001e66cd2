"""Issue 21 on the local control plane: a bad prompt costs one image, not a shard or the job; a pod
we stopped costs no attempt, a crash still does.

1. A failpoint makes the engine raise for one item inside a batch of 8 of a 3-shard job: the job
   ends Complete with every other image once, errors.jsonl names that item, the status counts 1
   failed item, no other item of the batch was made twice and no shard was retried (the
   failpoint's record of every batch call). With `maxFailedItems: 0` the same job ends Failed
   naming the item.
2. `imagebatch retry-failed` after the failpoint is cleared makes that one image; the joined
   manifest then holds every item once.
3. A worker whose main thread is blocked in one native call (it cannot run Python's SIGTERM
   handler) for longer than terminationGracePeriodSeconds is suspended, then scaled in, then
   deleted, and (a second test) preempted by Kueue: no shard's `failures` moves, with
   `maxAttempts: 1`, and the job completes with every image once.
4. A worker that SIGKILLs itself (no deletion) every time fails its shard after `maxAttempts`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from harness import (
    Failpoints,
    Kubectl,
    Operator,
    check_output_dir,
    condition,
    ibj,
    live_pods,
    shards,
    tiny_job,
    wait_condition,
    wait_for,
)
from test_kueue import assert_no_mismatch_evictions, evictions, queued_job, workload

from imagebatch.names import worker_job_name
from imagebatch_testing.kueue import KueueController
from imagebatch_testing.kueuequeues import TestQueues
from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster

JSON = dict[str, Any]
BIN = Path(sys.executable).parent
BAD = "p0000013"  # the 6th item of shard 1 (items 8-15): one batch of 8


def ids(n: int) -> set[str]:
    return {f"p{i:07d}" for i in range(n)}


def batch_calls(fail: Failpoints) -> list[JSON]:
    return [
        json.loads(x) for p in sorted(fail.dir.glob("batches-*.jsonl")) for x in p.read_text().splitlines()
    ]


def statuses(kubectl: Kubectl, namespace: str, job: str) -> dict[str, JSON]:
    return {s["metadata"]["name"]: s.get("status") or {} for s in shards(kubectl, namespace, job)}


def item_job(name: str, out: Path, fail: Failpoints, **spec: Any) -> JSON:
    return tiny_job(
        name,
        str(out),
        prompts=[f"a product photo of item {i}" for i in range(24)],
        batching={"batchSize": 8, "shardSize": 8},
        workers={"maxReplicas": 2, "shardsPerReplica": 1, "env": fail.env(f"batch:{BAD}=raise")},
        **spec,
    )


def test_a_bad_item_costs_one_image_and_retry_failed_makes_it(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    fail = Failpoints(tmp_path / "failpoints")
    kubectl.apply([item_job("itemfail", out, fail)], namespace)
    wait_condition(kubectl, namespace, "itemfail", "Complete", timeout=900)

    # Every other item exactly once, in the manifest and as an image.
    check_output_dir(out, ids(24) - {BAD})
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["error"]) for e in errors] == [(BAD, "FailpointItemError")]
    assert "product photo" not in (out / "errors.jsonl").read_text()  # no prompt bytes
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["id"] for r in rows if r.get("error")] == [BAD] and len(rows) == 24
    status = ibj(kubectl, namespace, "itemfail")["status"]
    assert status["items"] == {"total": 24, "done": 23, "failed": 1}
    assert status["errors"].endswith("/errors.jsonl")
    complete = condition(ibj(kubectl, namespace, "itemfail"), "Complete") or {}
    assert "1 failed" in complete["message"] and BAD in complete["message"], complete
    # No shard was retried, and the shard with the bad item is Done with it counted.
    by_name = statuses(kubectl, namespace, "itemfail")
    assert all(
        st["state"] == "Done" and st["attempt"] == 1 and not st.get("failures") for st in by_name.values()
    )
    assert sorted(st.get("itemsFailed", 0) for st in by_name.values()) == [0, 0, 1]
    # The engine's batch calls: each good item made by exactly one call that did not raise (none
    # of the bad item's 7 neighbours twice), the bad one by none; its batch of 8 split 8-4-2-1.
    calls = batch_calls(fail)
    made = Counter(i for c in calls if not c["raised"] for i in c["ids"])
    assert made == Counter(dict.fromkeys(ids(24) - {BAD}, 1))
    assert sorted(len(c["ids"]) for c in calls if c["raised"]) == [1, 2, 4, 8]

    # Retry only what failed, once the cause is gone (the failpoint is disarmed).
    fail.release()
    env = {**os.environ, "KUBECONFIG": str(kubectl.kubeconfig)}
    proc = subprocess.run(
        [str(BIN / "imagebatch"), "retry-failed", "itemfail", "-n", namespace, "--wait", "--timeout", "900"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1000,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "itemfail-retry: makes the 1 failed items of itemfail" in proc.stdout
    retry = ibj(kubectl, namespace, "itemfail-retry")
    assert retry["status"]["items"] == {"total": 1, "done": 1, "failed": 0}
    check_output_dir(out, ids(24))  # the joined manifest: every item once
    assert (out / "errors.jsonl").read_text() == ""
    assert not [r for r in pq.read_table(out / "manifest.parquet").to_pylist() if r.get("error")]
    (line,) = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines() if f'"{BAD}"' in x]
    assert line["prompt"] == "a product photo of item 13"


def test_with_max_failed_items_zero_the_same_job_fails_naming_the_item(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    fail = Failpoints(tmp_path / "failpoints")
    kubectl.apply([item_job("strict", out, fail, retries={"maxFailedItems": 0})], namespace)
    wait_condition(kubectl, namespace, "strict", "Failed", timeout=900)
    failed = condition(ibj(kubectl, namespace, "strict"), "Failed") or {}
    assert failed["reason"] == "ItemsFailed" and BAD in failed["message"], failed
    assert "retries.maxFailedItems=0" in failed["message"]
    check_output_dir(out, ids(24) - {BAD})  # the other images are all there, once
    assert all(
        st["state"] == "Done" and st["attempt"] == 1 for st in statuses(kubectl, namespace, "strict").values()
    )


def set_suspend(kubectl: Kubectl, namespace: str, name: str, value: bool) -> None:
    kubectl(
        "patch", "ibj", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": {"suspend": value}})
    )


def no_failures(kubectl: Kubectl, namespace: str, job: str) -> dict[str, JSON]:
    by_name = statuses(kubectl, namespace, job)
    assert all(not st.get("failures") for st in by_name.values()), by_name
    assert all(st.get("state") != "Failed" for st in by_name.values()), by_name
    return by_name


def test_a_worker_blocked_in_a_native_call_is_suspended_scaled_in_and_deleted_without_a_failure(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    n = 60
    # Every worker process blocks its main thread in libc at its first stored image (Python's
    # SIGTERM handler cannot run) for longer than its 4 s grace period, until released.
    # maxAttempts 1: a stop that counted as a failure would fail its shard, and the job.
    fail = Failpoints(tmp_path / "failpoints")
    job = tiny_job(
        "blocked",
        str(out),
        prompts=[f"a lantern in the fog, {i}" for i in range(n)],
        batching={"batchSize": 4, "shardSize": 20},
        retries={"maxAttempts": 1},
        workers={
            "maxReplicas": 1,
            "terminationGracePeriodSeconds": 4,
            "env": fail.env("image-stored@1=block"),
        },
    )
    kubectl.apply([job], namespace)

    seen: set[int] = set()

    def blocked(k: int) -> JSON:
        """The mark of the next worker process that blocked (marks are named by pid, not by time)."""

        def new() -> list[JSON]:
            return [m for m in fail.marks("image-stored") if m["pid"] not in seen]

        found: list[JSON] = wait_for(f"worker {k} blocked", new, 600, 0.2)
        assert len(found) == 1, found  # one worker at a time (maxReplicas 1)
        seen.add(found[0]["pid"])
        return found[0]

    def gone(pod: str) -> None:
        wait_for(
            f"pod {pod} gone",
            lambda: pod not in {p["metadata"]["name"] for p in live_pods(kubectl, namespace)},
            300,
        )

    # 1. Suspended.
    first = blocked(1)
    set_suspend(kubectl, namespace, "blocked", True)
    wait_condition(kubectl, namespace, "blocked", "Suspended", timeout=300)
    gone(first["pod"])
    wait_for(
        "claims released",
        lambda: all(
            st.get("state") != "Claimed" for st in no_failures(kubectl, namespace, "blocked").values()
        ),
        300,
    )
    assert no_failures(kubectl, namespace, "blocked")[first["shard"]]["state"] == "Pending"
    set_suspend(kubectl, namespace, "blocked", False)

    # 2. Scaled in: the worker Job's parallelism cut under the busy pod (the Job controller deletes it).
    second = blocked(2)
    kubectl(
        "patch",
        "job",
        worker_job_name("blocked"),
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"parallelism":0}}',
    )
    gone(second["pod"])
    wait_for(
        "its claim released",
        lambda: no_failures(kubectl, namespace, "blocked")[second["shard"]].get("holder") != second["pod"],
        300,
    )

    # 3. Deleted (a drain's or a user's `kubectl delete pod`); then the workers run through.
    third = blocked(3)
    fail.release()
    kubectl("delete", "pod", third["pod"], "-n", namespace, "--wait=false")
    wait_condition(kubectl, namespace, "blocked", "Complete", timeout=900)
    final = no_failures(kubectl, namespace, "blocked")
    assert all(st["state"] == "Done" for st in final.values())
    check_output_dir(out, ids(n))
    events = kubectl.json("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=blocked")
    reasons = [e.get("reason") for e in events["items"]]
    assert "HolderGone" not in reasons and "LeaseExpired" not in reasons, reasons


def test_a_worker_that_crashes_every_time_still_fails_its_shard_after_max_attempts(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    fail = Failpoints(tmp_path / "failpoints")
    job = tiny_job(
        "crashing",
        str(tmp_path / "out"),
        prompts=[f"a cracked vase, {i}" for i in range(10)],
        batching={"batchSize": 2, "shardSize": 10},
        retries={"maxAttempts": 2},
        workers={"maxReplicas": 1, "env": fail.env("image-stored@1=kill")},
    )
    kubectl.apply([job], namespace)
    wait_condition(kubectl, namespace, "crashing", "Failed", timeout=900)
    failed = condition(ibj(kubectl, namespace, "crashing"), "Failed") or {}
    assert failed["reason"] == "ShardsFailed", failed
    (st,) = statuses(kubectl, namespace, "crashing").values()
    assert st["state"] == "Failed" and st["failures"] == 2, st
    assert "is gone" in st["error"], st
    assert len(fail.marks("image-stored")) >= 2  # two processes crashed (SIGKILL, no deletion)


def test_a_worker_blocked_in_a_native_call_preempted_by_kueue_uses_no_attempt(
    kube_cluster: TestCluster,
    kubectl: Kubectl,
    running_operator: Operator,
    kueue: KueueController,
    kueue_queues: TestQueues,
    namespace: str,
    tmp_path: Path,
) -> None:
    out_low, out_high = tmp_path / "low", tmp_path / "high"
    n_low = 100
    # Both low workers block in libc at their first image, past their 4 s grace period;
    # maxAttempts 1: a preemption that cost an attempt would fail the job.
    fail = Failpoints(tmp_path / "failpoints")
    low = queued_job(
        "low",
        out_low,
        kueue_queues,
        n_low,
        env=fail.env("image-stored@1=block"),
        cpu="250m",
        max_replicas=2,
        priority=kueue_queues.low_priority,
        retries={"maxAttempts": 1},
    )
    low["spec"]["workers"]["terminationGracePeriodSeconds"] = 4
    kubectl.apply([low], namespace)
    fail.wait("image-stored")
    parallelism = int(
        kube_cluster.client.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{worker_job_name('low')}")[
            "spec"
        ]["parallelism"]
    )
    wait_for(
        f"all {parallelism} low workers blocked", lambda: len(fail.marks("image-stored")) >= parallelism, 600
    )
    held = {m["shard"] for m in fail.marks("image-stored")}

    fail_high = Failpoints(tmp_path / "failpoints-high")
    high = queued_job(
        "high",
        out_high,
        kueue_queues,
        50,
        env=fail_high.env("shard-done@1=hold"),
        priority=kueue_queues.high_priority,
    )
    kubectl.apply([high], namespace)
    wait_for(
        "Kueue to preempt the low job",
        lambda: any(
            e.get("reason") == "Preempted" for e in evictions(workload(kube_cluster, namespace, "low"))
        ),
        timeout=300,
    )
    wait_for("the low job's workers gone", lambda: not live_pods(kubectl, namespace, "low"), timeout=300)

    def claims_back() -> bool:
        by_name = no_failures(kubectl, namespace, "low")
        return all(st.get("state") != "Claimed" for st in by_name.values()) and all(
            by_name[name].get("state") == "Pending" for name in held
        )

    wait_for("the low job's claims back to Pending, no failure counted", claims_back, timeout=300)
    fail.release()
    fail_high.release()
    wait_condition(kubectl, namespace, "high", "Complete", timeout=900)
    wait_condition(kubectl, namespace, "low", "Complete", timeout=900)
    check_output_dir(out_low, ids(n_low))
    check_output_dir(out_high, ids(50))
    assert all(st["state"] == "Done" for st in no_failures(kubectl, namespace, "low").values())
    assert_no_mismatch_evictions(kubectl, kueue, namespace)
