"""Acceptance (4) and (5): a worker SIGKILLed mid-shard and an operator killed mid-job lose
nothing and duplicate nothing; bad manifests are refused by the API server; a model that cannot
be loaded fails the job with its reason, without crash-looping workers."""

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
    condition,
    ibj,
    shards,
    tiny_job,
    wait_condition,
    wait_for,
    worker_pids,
)

from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster


def victim_of(kubectl: Kubectl, namespace: str, mark: dict[str, Any], shard_size: int) -> dict[str, Any]:
    """The shard a stopped worker held: its status was written before the worker stopped."""
    shard = next(s for s in shards(kubectl, namespace) if s["metadata"]["name"] == mark["shard"])
    st = shard["status"]
    assert st["state"] == "Claimed" and st["holder"] == mark["pod"], st
    assert 0 < st["itemsDone"] < shard_size, st
    return shard


def test_killed_worker_and_operator_lose_nothing(
    kube_cluster: TestCluster, kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    if kube_cluster.local is None:
        pytest.skip("needs the local node agent to kill a worker process")
    out = tmp_path / "out"
    n = 600
    fail = Failpoints(tmp_path / "failpoints")
    job = tiny_job(
        "chaos",
        str(out),
        prompts=[f"a photo of object number {i}" for i in range(n)],
        generation={"steps": 20},
        batching={"batchSize": 8, "shardSize": 100},
        retries={"leaseSeconds": 10, "maxAttempts": 3},
        # The first worker to store an image stops itself there, its progress on the shard.
        workers={"maxReplicas": 2, "shardsPerReplica": 1, "env": fail.env("image-stored@1=stop-once")},
    )
    kubectl.apply([job], namespace)

    mark = fail.wait("image-stored")
    victim = victim_of(kubectl, namespace, mark, 100)
    pids = worker_pids(kube_cluster.local.pod_processes(), mark["pod"])
    assert mark["pid"] in pids, f"no process found for pod {mark['pod']}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    # The operator dies too, before it could notice, and comes back.
    running_operator.kill()
    running_operator.start()

    wait_condition(kubectl, namespace, "chaos", "Complete", timeout=900)
    after = {s["metadata"]["name"]: s["status"] for s in shards(kubectl, namespace)}
    assert after[victim["metadata"]["name"]]["attempt"] >= 2, after[victim["metadata"]["name"]]
    assert all(st["state"] == "Done" for st in after.values())
    check_output_dir(out, {f"p{i:07d}" for i in range(n)})
    assert ibj(kubectl, namespace, "chaos")["status"]["items"] == {"total": n, "done": n, "failed": 0}


def _bad(change: dict[str, Any]) -> dict[str, Any]:
    job = tiny_job("bad", "/tmp/never", prompts=["a cat"])
    spec = job["spec"]
    for path, value in change.items():
        *parents, leaf = path.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return job


BAD = [
    ({"output": None}, "spec.output"),
    ({"generation.steps": 0}, "spec.generation.steps"),
    ({"retries.leaseSeconds": 5}, "spec.retries.leaseSeconds"),
    ({"output.format": "gif"}, "spec.output.format"),
    ({"workers.maxReplicas": 0}, "spec.workers.maxReplicas"),
    ({"generation.widht": 64}, "widht"),
    ({"batching.shardSize": 0}, "spec.batching.shardSize"),
]


def test_bad_manifests_are_refused_naming_the_field(kubectl: Kubectl, namespace: str) -> None:
    for change, field in BAD:
        proc = kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_bad(change)), check=False)
        assert proc.returncode != 0, f"{change} was accepted"
        assert field in proc.stderr, f"{change}: {proc.stderr}"
    assert "bad" not in kubectl("get", "ibj", "-n", namespace).stdout


def test_unloadable_model_fails_without_crash_loop(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    job = tiny_job(
        "no-model",
        str(tmp_path / "out"),
        model={"name": "/models/does-not-exist"},
        prompts=[f"prompt {i}" for i in range(40)],
        batching={"shardSize": 10},
        workers={"maxReplicas": 2, "shardsPerReplica": 1},
    )
    kubectl.apply([job], namespace)
    wait_condition(kubectl, namespace, "no-model", "Failed", timeout=600)
    failed = condition(ibj(kubectl, namespace, "no-model"), "Failed")
    assert failed is not None and failed["reason"] == "ModelLoadError", failed
    assert "does-not-exist" in failed["message"]
    stalled = condition(ibj(kubectl, namespace, "no-model"), "Stalled")
    assert stalled is not None and stalled["status"] == "True"

    def pods() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = kubectl.json("get", "pods", "-n", namespace)["items"]
        return items

    # No crash loop: the worker Job failed (so it makes no more pods), no pod restarted, and
    # passes of the operator after the failure replaced nothing.
    def worker_job() -> dict[str, Any]:
        got: dict[str, Any] = kubectl.json("get", "job", "no-model-workers", "-n", namespace)
        return got

    def makes_no_more_pods() -> bool:
        wj = worker_job()
        failed = (condition(wj, "Failed") or {}).get("status") == "True"
        return failed or wj["spec"].get("parallelism") == 0

    wait_for("the worker Job failed or scaled to 0", makes_no_more_pods, timeout=300)
    wait_for(
        "no running workers",
        lambda: all(p["status"].get("phase") in ("Succeeded", "Failed") for p in pods()),
        timeout=300,
    )
    seen = {p["metadata"]["name"] for p in pods()}
    uid = worker_job()["metadata"]["uid"]
    assert len(seen) <= 2, seen
    running_operator.wait_passes(namespace, "no-model")
    for p in pods():
        for cs in p["status"].get("containerStatuses") or []:
            assert cs.get("restartCount", 0) == 0
    assert {p["metadata"]["name"] for p in pods()} <= seen
    assert worker_job()["metadata"]["uid"] == uid, "the operator replaced the failed worker Job"
    print(
        "worker Job conditions:",
        [(c["type"], c["status"]) for c in worker_job()["status"].get("conditions") or []],
    )


def test_active_deadline_fails_the_job_and_stops_workers(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    # Workers hold after their first image until SIGTERM: the job cannot finish before its
    # deadline, however fast the machine.
    fail = Failpoints(tmp_path / "failpoints")
    job = tiny_job(
        "deadline",
        str(tmp_path / "out"),
        prompts=[f"prompt {i}" for i in range(400)],
        workers={"env": fail.env("image-stored@1=hold")},
        activeDeadlineSeconds=5,
    )
    kubectl.apply([job], namespace)
    wait_condition(kubectl, namespace, "deadline", "Failed", timeout=300)
    failed = condition(ibj(kubectl, namespace, "deadline"), "Failed")
    assert failed is not None and failed["reason"] == "DeadlineExceeded", failed
    # The workers stop: parallelism 0, or the Job failed by its own activeDeadlineSeconds.
    wait_for(
        "no running workers",
        lambda: all(
            p["status"].get("phase") in ("Succeeded", "Failed")
            for p in kubectl.json("get", "pods", "-n", namespace)["items"]
        ),
        timeout=300,
    )


def test_missing_prompt_file_fails_planning(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    job = tiny_job("no-file", str(tmp_path / "out"), promptsFrom={"uri": str(tmp_path / "missing.txt")})
    kubectl.apply([job], namespace)
    wait_condition(kubectl, namespace, "no-file", "Failed", timeout=600)
    failed = condition(ibj(kubectl, namespace, "no-file"), "Failed")
    assert failed is not None and failed["reason"] == "PlanningFailed", failed
    # The planning worker's own words (its termination message), not a pointer to its logs.
    assert (
        failed["message"].startswith("spec.promptsFrom.uri: prompt file")
        and "does not exist" in failed["message"]
    )
    pods = kubectl.json("get", "pods", "-n", namespace)["items"]
    assert len(pods) == 1  # exit code 2 fails the Job at once: no retries of a user error


def test_a_paused_worker_loses_its_claim_and_cannot_complete_it(
    kube_cluster: TestCluster, kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    """A worker stopped (SIGSTOP) past its lease: the operator requeues the shard (LeaseExpired),
    another worker takes it, and the woken zombie's completion is refused by the fence."""
    if kube_cluster.local is None:
        pytest.skip("needs the local node agent to pause a worker process")
    out = tmp_path / "out"
    n = 400
    fail = Failpoints(tmp_path / "failpoints")
    job = tiny_job(
        "zombie",
        str(out),
        prompts=[f"a drawing of thing {i}" for i in range(n)],
        generation={"steps": 20},
        batching={"batchSize": 8, "shardSize": 100},
        retries={"leaseSeconds": 10},
        workers={"maxReplicas": 2, "shardsPerReplica": 1, "env": fail.env("image-stored@1=stop-once")},
    )
    kubectl.apply([job], namespace)

    mark = fail.wait("image-stored")  # the zombie has stopped itself, lease thread and all
    name, zombie = victim_of(kubectl, namespace, mark, 100)["metadata"]["name"], mark["pod"]
    pids = worker_pids(kube_cluster.local.pod_processes(), zombie)
    assert mark["pid"] in pids
    try:

        def taken_over() -> bool:
            st = (
                next(s for s in shards(kubectl, namespace) if s["metadata"]["name"] == name).get("status")
                or {}
            )
            return st.get("attempt", 0) >= 2 and st.get("holder") != zombie

        wait_for("the shard claimed by another worker", taken_over, timeout=600, interval=0.5)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

    wait_condition(kubectl, namespace, "zombie", "Complete", timeout=900)
    final = next(s for s in shards(kubectl, namespace) if s["metadata"]["name"] == name)["status"]
    assert final["state"] == "Done" and final["holder"] != zombie and final["attempt"] >= 2
    check_output_dir(out, {f"p{i:07d}" for i in range(n)})
    log = wait_for(
        "the zombie to notice",
        lambda: (
            (text := kube_cluster.pod_log(namespace, zombie))
            and ("lost the claim" in text or "after its claim was lost" in text)
            and text
        ),
        timeout=300,
    )
    assert "lost the claim" in log or "after its claim was lost" in log, log[-3000:]
    events = kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert '"reason": "LeaseExpired"' in events
