"""Issues 14 and 22, with the real Kueue (imagebatch_testing.kueue): jobs with spec.queueName wait for
quota as `Queued`, a higher-priority job preempts a running one without losing or repeating an
image or using an attempt, and queued time does not count against activeDeadlineSeconds; a job
whose workers can never fit its ClusterQueue says so and runs once maxReplicas is lowered, and a
job wider than the free quota starts with what fits (partial admission from minReplicas).

Every test gets a ClusterQueue with quota for 500m cpu (`kueue_queues`). Each worker pod of a
job that must hold the whole quota requests all of it, so whether one job fits does not depend
on the parallelism the operator picks. No job here may lose its Workload to a pod count that no
longer matches its admission: Kueue's Events and log are checked for that eviction every time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

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

from imagebatch.names import worker_job_name
from imagebatch_testing.kueue import KueueController
from imagebatch_testing.kueueconfig import MISMATCH_MESSAGES, PRIORITY_LABEL
from imagebatch_testing.kueuequeues import TestQueues, admitted, workload_condition, workload_of_job
from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster

JSON = dict[str, Any]
QUEUED_REASONS = ("Queued", "WaitingForQueue")
# Kueue's Stopped Events for a Job that no longer matches its Workload (jobframework/reconciler.go).
STOPPED_FOR_MISMATCH = ("No matching Workload", "Missing Workload")


def queued_job(
    name: str,
    out: Path,
    queues: TestQueues,
    n: int,
    *,
    env: list[JSON] | None = None,
    cpu: str = "500m",
    max_replicas: int = 1,
    min_replicas: int = 0,
    shard_size: int = 25,
    priority: str | None = None,
    **spec: Any,
) -> JSON:
    """A tiny job on the test's LocalQueue; each worker requests `cpu` of the 500m quota."""
    workers: JSON = {
        "maxReplicas": max_replicas,
        "minReplicas": min_replicas,
        "shardsPerReplica": 1,
        "resources": {"requests": {"cpu": cpu}},
    }
    if env is not None:
        workers["env"] = env
    job = tiny_job(
        name,
        str(out),
        prompts=[f"{name}: a lighthouse at dusk, variation {i}" for i in range(n)],
        batching={"batchSize": 5, "shardSize": shard_size},
        workers=workers,
        queueName=queues.local_queue,
        **spec,
    )
    if priority:
        job["metadata"]["labels"] = {PRIORITY_LABEL: priority}
    return job


def state(kubectl: Kubectl, namespace: str, name: str) -> str:
    return str((ibj(kubectl, namespace, name).get("status") or {}).get("state") or "")


def is_queued(job: JSON) -> bool:
    """The STATE field and the Queued condition agree that the job waits for its queue."""
    cond = condition(job, "Queued") or {}
    return (
        (job.get("status") or {}).get("state") == "Queued"
        and cond.get("status") == "True"
        and cond.get("reason") in QUEUED_REASONS
    )


def column(kubectl: Kubectl, namespace: str, name: str, header: str) -> str:
    """A printer column of `kubectl get ibj` as a user reads it (columns are left-aligned)."""
    lines = kubectl("get", "ibj", name, "-n", namespace).stdout.splitlines()
    head = lines[0]
    assert f" {header} " in f" {head} ", f"no {header} column in {head!r}"
    at = f" {head} ".index(f" {header} ")
    return lines[1][at:].split()[0] if len(lines[1]) > at else ""


def worker_job(kube_cluster: TestCluster, namespace: str, job: str) -> JSON:
    return kube_cluster.client.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{worker_job_name(job)}")


def workload(kube_cluster: TestCluster, namespace: str, job: str) -> JSON | None:
    wj = kube_cluster.client.get_or_none(f"/apis/batch/v1/namespaces/{namespace}/jobs/{worker_job_name(job)}")
    return workload_of_job(kube_cluster.client, namespace, wj["metadata"]["uid"]) if wj else None


def evictions(wl: JSON | None) -> list[JSON]:
    stats = ((wl or {}).get("status") or {}).get("schedulingStats") or {}
    found: list[JSON] = stats.get("evictions") or []
    return found


def assert_no_mismatch_evictions(kubectl: Kubectl, kueue: KueueController, namespace: str) -> None:
    """No worker Job was stopped for no longer matching its Workload (its parallelism changed
    after admission): not in Kueue's Events on the Jobs, not in Kueue's log."""
    events = kubectl.json("get", "events", "-n", namespace)["items"]
    bad = [
        f"{e['involvedObject']['kind']}/{e['involvedObject']['name']}: {e.get('reason')}: {e.get('message')}"
        for e in events
        if e.get("reason") == "DeletedWorkload"
        or (e.get("reason") == "Stopped" and (e.get("message") or "").startswith(STOPPED_FOR_MISMATCH))
    ]
    assert not bad, f"Kueue stopped worker Jobs that no longer matched their Workload: {bad}"
    logged = [r for r in kueue.log_records(namespace) if r.get("msg") in MISMATCH_MESSAGES]
    assert not logged, f"Kueue's log: {logged}"


def test_second_job_waits_queued_until_the_first_completes(
    kube_cluster: TestCluster,
    kubectl: Kubectl,
    running_operator: Operator,
    kueue: KueueController,
    kueue_queues: TestQueues,
    namespace: str,
    tmp_path: Path,
) -> None:
    out_first, out_second = tmp_path / "first", tmp_path / "second"
    # The first job's worker holds after its first shard: it keeps the quota for as long as the
    # test looks at the second, however fast the machine.
    fail = Failpoints(tmp_path / "failpoints")
    kubectl.apply(
        [queued_job("first", out_first, kueue_queues, 100, env=fail.env("shard-done@1=hold"))], namespace
    )
    fail.wait("shard-done")
    assert admitted(workload(kube_cluster, namespace, "first"))
    wait_for("the first job Running", lambda: state(kubectl, namespace, "first") == "Running", timeout=300)
    assert (condition(ibj(kubectl, namespace, "first"), "Queued") or {}).get("status") != "True"

    kubectl.apply([queued_job("second", out_second, kueue_queues, 60)], namespace)
    wait_for("the second job Queued", lambda: is_queued(ibj(kubectl, namespace, "second")), timeout=300)
    assert column(kubectl, namespace, "second", "STATE") == "Queued"
    # Still queued after more passes of the operator: no pods, its Job suspended, its Workload pending.
    running_operator.wait_passes(namespace, "second")
    assert is_queued(ibj(kubectl, namespace, "second"))
    assert not live_pods(kubectl, namespace, "second")
    assert worker_job(kube_cluster, namespace, "second")["spec"]["suspend"] is True
    wl = workload(kube_cluster, namespace, "second")
    assert wl is not None and not admitted(wl)
    assert (workload_condition(wl, "QuotaReserved") or {}).get("status") == "False"

    fail.release()
    wait_condition(kubectl, namespace, "first", "Complete", timeout=900)
    wait_condition(kubectl, namespace, "second", "Complete", timeout=900)
    check_output_dir(out_first, {f"p{i:07d}" for i in range(100)})
    check_output_dir(out_second, {f"p{i:07d}" for i in range(60)})
    second = ibj(kubectl, namespace, "second")
    assert second["status"]["state"] == "Complete"
    assert (condition(second, "Queued") or {}).get("status") == "False"
    assert column(kubectl, namespace, "second", "STATE") == "Complete"
    for job in ("first", "second"):
        assert not evictions(workload(kube_cluster, namespace, job)), job
    assert_no_mismatch_evictions(kubectl, kueue, namespace)


def test_higher_priority_job_preempts_and_the_preempted_one_resumes(
    kube_cluster: TestCluster,
    kubectl: Kubectl,
    running_operator: Operator,
    kueue: KueueController,
    kueue_queues: TestQueues,
    namespace: str,
    tmp_path: Path,
) -> None:
    out_low, out_high = tmp_path / "low", tmp_path / "high"
    n_low = 200
    # Up to two low workers of 250m each; each holds mid-way through its second shard (a claim
    # with progress on it) until it is stopped. maxAttempts 1: a preemption that cost an attempt
    # would fail the shard, and with it the job.
    fail = Failpoints(tmp_path / "failpoints")
    low = queued_job(
        "low",
        out_low,
        kueue_queues,
        n_low,
        env=fail.env("image-stored@30=hold"),
        cpu="250m",
        max_replicas=2,
        priority=kueue_queues.low_priority,
        retries={"maxAttempts": 1},
    )
    kubectl.apply([low], namespace)
    fail.wait("image-stored")
    parallelism = int(worker_job(kube_cluster, namespace, "low")["spec"]["parallelism"])
    wait_for(
        f"all {parallelism} low workers holding a claim",
        lambda: len(fail.marks("image-stored")) >= parallelism,
        timeout=600,
    )
    held = {m["shard"] for m in fail.marks("image-stored")}
    assert admitted(workload(kube_cluster, namespace, "low"))
    wait_for("the low job Running", lambda: state(kubectl, namespace, "low") == "Running", timeout=300)

    # The high job needs the whole quota: Kueue can admit it only by preempting the low one. Its
    # worker holds after its first shard, so the low job stays preempted while the test looks.
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

    def preempted() -> bool:
        return any(
            e.get("reason") == "Preempted" for e in evictions(workload(kube_cluster, namespace, "low"))
        )

    wait_for("Kueue to preempt the low job", preempted, timeout=300)
    wait_for("the low job's workers gone", lambda: not live_pods(kubectl, namespace, "low"), timeout=300)

    def claims_back() -> bool:
        by_name = {s["metadata"]["name"]: s.get("status") or {} for s in shards(kubectl, namespace, "low")}
        return all(st.get("state") != "Claimed" for st in by_name.values()) and all(
            by_name[name].get("state") == "Pending" for name in held
        )

    wait_for("the low job's claims back to Pending", claims_back, timeout=300)
    wait_for("the low job Queued", lambda: is_queued(ibj(kubectl, namespace, "low")), timeout=300)
    fail_high.wait("shard-done")
    assert worker_job(kube_cluster, namespace, "low")["spec"]["suspend"] is True
    assert not admitted(workload(kube_cluster, namespace, "low"))
    assert is_queued(ibj(kubectl, namespace, "low")) and not live_pods(kubectl, namespace, "low")
    assert not [
        s for s in shards(kubectl, namespace, "low") if (s.get("status") or {}).get("state") == "Failed"
    ]

    fail.release()  # the low job's workers after the resume run through
    fail_high.release()
    wait_condition(kubectl, namespace, "high", "Complete", timeout=900)
    wait_condition(kubectl, namespace, "low", "Complete", timeout=900)
    check_output_dir(out_high, {f"p{i:07d}" for i in range(50)})
    check_output_dir(out_low, {f"p{i:07d}" for i in range(n_low)})
    low_shards = shards(kubectl, namespace, "low")
    assert all(s["status"]["state"] == "Done" for s in low_shards)
    # The held shards were taken back from SIGTERMed workers, not lost: no error on them.
    assert not [s["metadata"]["name"] for s in low_shards if s["status"].get("error")]

    assert_no_mismatch_evictions(kubectl, kueue, namespace)
    # Kueue evicted the low job once, for the preemption, and the high job never.
    assert [e["reason"] for e in evictions(workload(kube_cluster, namespace, "low"))] == ["Preempted"]
    assert not evictions(workload(kube_cluster, namespace, "high"))
    events = kubectl.json("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=low")
    reasons = {e.get("reason") for e in events["items"] if e["involvedObject"]["kind"] == "ImageBatchJob"}
    assert "Preempted" in reasons, reasons


def test_queued_time_does_not_count_against_the_deadline(
    kube_cluster: TestCluster,
    kubectl: Kubectl,
    running_operator: Operator,
    kueue: KueueController,
    kueue_queues: TestQueues,
    namespace: str,
    tmp_path: Path,
) -> None:
    deadline = 90  # far more than the waiting job's 25 images take, far less than it waits queued
    fail = Failpoints(tmp_path / "failpoints")
    kubectl.apply(
        [queued_job("blocker", tmp_path / "blocker", kueue_queues, 50, env=fail.env("shard-done@1=hold"))],
        namespace,
    )
    fail.wait("shard-done")
    kubectl.apply(
        [queued_job("waiter", tmp_path / "waiter", kueue_queues, 25, activeDeadlineSeconds=deadline)],
        namespace,
    )
    queued_since = time.monotonic()
    wait_for("the waiting job Queued", lambda: is_queued(ibj(kubectl, namespace, "waiter")), timeout=300)

    def queued_past_deadline() -> bool:
        job = ibj(kubectl, namespace, "waiter")
        failed = condition(job, "Failed") or {}
        assert failed.get("status") != "True", f"failed while queued: {failed.get('message')}"
        assert is_queued(job), job.get("status")
        return time.monotonic() - queued_since > deadline + 10

    # Queued for longer than the whole deadline: the wait is the point of this test.
    wait_for("the waiting job queued past its deadline", queued_past_deadline, timeout=deadline + 300)
    fail.release()
    wait_condition(kubectl, namespace, "waiter", "Complete", timeout=900)
    check_output_dir(tmp_path / "waiter", {f"p{i:07d}" for i in range(25)})
    waiter = ibj(kubectl, namespace, "waiter")
    assert waiter["status"]["state"] == "Complete"
    assert_no_mismatch_evictions(kubectl, kueue, namespace)


def test_workers_that_never_fit_say_so_and_a_wide_job_starts_with_what_fits(
    kube_cluster: TestCluster,
    kubectl: Kubectl,
    running_operator: Operator,
    kueue: KueueController,
    kueue_queues: TestQueues,
    namespace: str,
    tmp_path: Path,
) -> None:
    n = 20  # 4 shards of 5: a backlog for 4 workers
    # 4 workers of 250m, all of them needed (minReplicas 4): 1000m against the 500m ClusterQueue.
    never = queued_job(
        "never", tmp_path / "never", kueue_queues, n, cpu="250m", max_replicas=4, min_replicas=4, shard_size=5
    )
    kubectl.apply([never], namespace)

    def never_admittable() -> JSON | None:
        cond = condition(ibj(kubectl, namespace, "never"), "Queued") or {}
        return cond if cond.get("reason") == "NeverAdmittable" else None

    cond = wait_for("the job to say it can never be admitted", never_admittable, timeout=300)
    assert cond["status"] == "True" and state(kubectl, namespace, "never") == "Queued"
    # Kueue's capacity, and the fields to lower.
    assert "maximum capacity (500m)" in cond["message"], cond["message"]
    assert "spec.workers.maxReplicas" in cond["message"], cond["message"]

    # What a user tries next: fewer workers. No suspend: the worker Job is made again at 2.
    patch = {"spec": {"workers": {"maxReplicas": 2, "minReplicas": 2}}}
    kubectl("patch", "ibj", "never", "-n", namespace, "--type=merge", "-p", json.dumps(patch))
    wait_condition(kubectl, namespace, "never", "Complete", timeout=900)
    check_output_dir(tmp_path / "never", {f"p{i:07d}" for i in range(n)})
    events = kubectl.json("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=never")
    mine = [e for e in events["items"] if e["involvedObject"]["kind"] == "ImageBatchJob"]
    reasons = [e.get("reason") for e in mine]
    assert "Admitted" in reasons and "Suspended" not in reasons, reasons
    made = [e["message"] for e in mine if e.get("reason") == "ScaledUp"]
    assert "started worker Job with 4 workers" in made and "started worker Job with 2 workers" in made, made

    # The quota is all free again (the finished job's worker Job is deleted), so what fits is known.
    cq = f"/apis/kueue.x-k8s.io/v1beta2/clusterqueues/{kueue_queues.cluster_queue}"
    wait_for(
        "the ClusterQueue's quota free",
        lambda: (kube_cluster.client.get(cq).get("status") or {}).get("reservingWorkloads") == 0,
        timeout=300,
    )

    # 4 workers of 250m with minReplicas 1: Kueue admits the 2 that fit at once.
    wide = queued_job(
        "wide", tmp_path / "wide", kueue_queues, n, cpu="250m", max_replicas=4, min_replicas=1, shard_size=5
    )
    kubectl.apply([wide], namespace)
    wait_for("the wide job admitted", lambda: admitted(workload(kube_cluster, namespace, "wide")), 300)
    wl_obj = workload(kube_cluster, namespace, "wide")
    assert wl_obj is not None
    assert wl_obj["spec"]["podSets"][0]["count"] == 4 and wl_obj["spec"]["podSets"][0]["minCount"] == 1
    (assignment,) = wl_obj["status"]["admission"]["podSetAssignments"]
    assert assignment["count"] == 2, assignment
    wait_condition(kubectl, namespace, "wide", "Complete", timeout=900)
    check_output_dir(tmp_path / "wide", {f"p{i:07d}" for i in range(n)})
    assert_no_mismatch_evictions(kubectl, kueue, namespace)
