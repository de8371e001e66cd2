"""The API server frozen (SIGSTOP) for longer than the job's lease while a worker finishes a
shard: the job completes with every image once, no worker crashes, the operator lives on."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Failpoints, Kubectl, Operator, check_output_dir, ibj, tiny_job, wait_condition, wait_for

from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster

LEASE = 10  # seconds: the smallest lease the API accepts


def test_an_api_outage_longer_than_the_lease_loses_nothing_and_crashes_no_worker(
    kube_cluster: TestCluster, kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    if kube_cluster.local is None:
        pytest.skip("needs the local control plane to stop its API server")
    out = tmp_path / "out"
    n = 200
    fail = Failpoints(tmp_path / "failpoints")
    job = tiny_job(
        "outage",
        str(out),
        prompts=[f"a sketch of thing {i}" for i in range(n)],
        batching={"batchSize": 5, "shardSize": 50},
        retries={"leaseSeconds": LEASE},
        # Each worker holds after its 5th image, mid-shard, its progress on the shard's status.
        workers={"maxReplicas": 2, "shardsPerReplica": 1, "env": fail.env("image-stored@5=hold")},
    )
    kubectl.apply([job], namespace)
    mark = fail.wait("image-stored")
    part = out / "manifest" / f"{mark['shard'].rsplit('-', 1)[1]}.jsonl"
    assert not part.exists()

    with kube_cluster.local.paused("kube-apiserver"):
        stopped = time.monotonic()
        fail.release()  # the held worker goes on with its shard while the API is away
        wait_for("the held worker to finish its shard's images and manifest part", part.exists, timeout=600)
        # Longer than the lease (and than the client's 30 s read timeout): renewals fail, the
        # claim's lease runs out, and the worker's completion must wait for the API.
        while time.monotonic() - stopped < 3 * LEASE + 5:
            time.sleep(0.5)
    outage = time.monotonic() - stopped

    wait_condition(kubectl, namespace, "outage", "Complete", timeout=900)
    check_output_dir(out, {f"p{i:07d}" for i in range(n)})
    assert ibj(kubectl, namespace, "outage")["status"]["items"] == {"total": n, "done": n, "failed": 0}

    def pods() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = kubectl.json("get", "pods", "-n", namespace)["items"]
        return items

    wait_for(
        "the workers to exit",
        lambda: all(p["status"].get("phase") in ("Succeeded", "Failed") for p in pods()),
        timeout=300,
    )
    for p in pods():
        for cs in p["status"].get("containerStatuses") or []:
            assert cs.get("restartCount", 0) == 0, (p["metadata"]["name"], cs)
    # Every worker that ever ran here, pods since deleted too (the operator replaces a finished
    # worker Job when a shard is requeued): the node agent's log of each container's exits.
    local = kube_cluster.local
    assert local is not None
    logs = {
        d.name: "".join(f.read_text(errors="replace") for f in sorted((d / "logs").glob("*.log")))
        for d in sorted((local.node_dir / "pods").glob(f"{namespace}_*"))
    }
    assert logs, "no worker pod ran"
    for pod, text in logs.items():
        codes = [int(c) for c in re.findall(r"\[nodeagent\] \S+ exited with code (-?\d+)", text)]
        # 0: nothing left to claim; 143: SIGTERM when the operator scaled the finished job to 0.
        assert codes and set(codes) <= {0, 143}, (pod, codes, text[-3000:])
        assert "Traceback" not in text, (pod, text[-3000:])
    # The outage reached the worker that finished its shard: its API calls were retried. (Its pod
    # may be gone by now, replaced with its Job: the node agent keeps the log.)
    held = kube_cluster.pod_log(namespace, mark["pod"])
    assert "trying again in" in held, held[-3000:]
    assert "Traceback" not in held, held[-3000:]
    assert running_operator.proc is not None and running_operator.proc.poll() is None, "the operator died"
    print(f"API server stopped for {outage:.0f} s (lease {LEASE} s)")
