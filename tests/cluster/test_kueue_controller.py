"""The real Kueue in the local cluster: a queued batch/v1 Job gets a Workload, is admitted and
unsuspended; one beyond the ClusterQueue's quota waits, suspended, until quota frees.
Also: Jobs without a queue-name label are not Kueue's (the other tests' Jobs run as before)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from imagebatch_testing.cluster import create_namespace, wait_until
from imagebatch_testing.kubeapi import KubeClient
from imagebatch_testing.kueue import KueueController
from imagebatch_testing.kueueconfig import QUEUE_LABEL
from imagebatch_testing.kueuequeues import (
    admitted,
    create_queues,
    delete_queues,
    workload_condition,
    workload_of_job,
)
from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster

JSON = dict[str, Any]
# Each pod runs until the test writes its release file: the first Job holds the whole quota for
# as long as the test looks at the second.
HOLD = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.1)\n"


def job(name: str, release: Path, queue: str | None, cpu: str = "500m") -> JSON:
    labels = {QUEUE_LABEL: queue} if queue else {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "suspend": bool(queue),
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.11-slim",
                            "command": ["python", "-c", HOLD, str(release)],
                            "resources": {"requests": {"cpu": cpu}},
                        }
                    ],
                }
            },
        },
    }


def get_job(client: KubeClient, namespace: str, name: str) -> JSON:
    return client.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")


def succeeded(client: KubeClient, namespace: str, name: str) -> bool:
    conditions = (get_job(client, namespace, name).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)


def test_kueue_admits_within_quota_and_queues_beyond(
    kube_cluster: TestCluster, kueue: KueueController, tmp_path: Path
) -> None:
    client = kube_cluster.client
    namespace = f"kueue-smoke-{uuid.uuid4().hex[:6]}"
    create_namespace(client, namespace)
    queues = create_queues(client, namespace, {"cpu": "500m"})
    jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    try:
        first, second = tmp_path / "release-first", tmp_path / "release-second"
        client.create(jobs, job("first", first, queues.local_queue))
        uid_first = get_job(client, namespace, "first")["metadata"]["uid"]

        # Kueue makes a Workload for it, admits it to the ClusterQueue and unsuspends the Job.
        wait_until(
            "the first Job's Workload admitted",
            lambda: admitted(workload_of_job(client, namespace, uid_first)),
            120,
        )
        wait_until(
            "the first Job unsuspended and its pod running",
            lambda: (get_job(client, namespace, "first").get("status") or {}).get("active") == 1,
            120,
        )
        wl_first = workload_of_job(client, namespace, uid_first)
        assert wl_first is not None
        assert wl_first["status"]["admission"]["clusterQueue"] == queues.cluster_queue

        # The second does not fit next to it: a Workload, pending, and the Job stays suspended.
        client.create(jobs, job("second", second, queues.local_queue))
        uid_second = get_job(client, namespace, "second")["metadata"]["uid"]

        def pending_for_quota() -> bool:
            wl = workload_of_job(client, namespace, uid_second)
            reserved = workload_condition(wl, "QuotaReserved") or {}
            return reserved.get("status") == "False" and reserved.get("reason") == "Pending"

        wait_until("the second Job's Workload pending for quota", pending_for_quota, 120)
        assert get_job(client, namespace, "second")["spec"]["suspend"] is True
        assert not admitted(workload_of_job(client, namespace, uid_second))
        assert not (get_job(client, namespace, "second").get("status") or {}).get("active")

        # A Job without the label is not Kueue's: it runs at once, no Workload, however full the queue.
        plain = tmp_path / "release-plain"
        plain.write_text("")
        client.create(jobs, job("plain", plain, None, cpu="1"))
        wait_until("the unlabelled Job Complete", lambda: succeeded(client, namespace, "plain"), 120)
        uid_plain = get_job(client, namespace, "plain")["metadata"]["uid"]
        assert workload_of_job(client, namespace, uid_plain) is None

        # The first finishes: its quota goes to the second, which Kueue admits and unsuspends.
        first.write_text("")
        wait_until("the first Job Complete", lambda: succeeded(client, namespace, "first"), 120)
        wait_until(
            "the second Job's Workload admitted",
            lambda: admitted(workload_of_job(client, namespace, uid_second)),
            120,
        )
        assert get_job(client, namespace, "second")["spec"]["suspend"] is False
        second.write_text("")
        wait_until("the second Job Complete", lambda: succeeded(client, namespace, "second"), 120)
        finished = workload_condition(workload_of_job(client, namespace, uid_second), "Finished")
        assert finished is not None and finished["status"] == "True"
    finally:
        client.delete(f"/api/v1/namespaces/{namespace}")
        delete_queues(client, queues)
