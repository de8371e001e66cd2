"""The Kueue objects a test uses: its own ResourceFlavor, ClusterQueue and LocalQueue, the two
shared WorkloadPriorityClasses, and the Workloads Kueue makes for Jobs (read-only helpers)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from imagebatch_testing.kubeapi import ApiError, KubeClient
from imagebatch_testing.kueueconfig import API
from imagebatch_testing.processes import wait_until

JSON = dict[str, Any]
# The two WorkloadPriorityClasses every test may use (kueue.x-k8s.io/priority-class: <name>).
LOW_PRIORITY = "imagebatch-test-low"
HIGH_PRIORITY = "imagebatch-test-high"
PRIORITY_VALUES = {LOW_PRIORITY: 100, HIGH_PRIORITY: 1000}


# -- queue objects (pure) ------------------------------------------------------------------------


def resource_flavor(name: str) -> JSON:
    return {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": name}}


def cluster_queue(name: str, flavor: str, quota: dict[str, str]) -> JSON:
    """A ClusterQueue for every namespace with `quota` (e.g. {"cpu": "500m"}) of one flavor,
    which preempts lower-priority workloads of its own to admit higher ones."""
    return {
        "apiVersion": API,
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {},
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [
                {
                    "coveredResources": sorted(quota),
                    "flavors": [
                        {
                            "name": flavor,
                            "resources": [{"name": r, "nominalQuota": q} for r, q in sorted(quota.items())],
                        }
                    ],
                }
            ],
        },
    }


def local_queue(namespace: str, name: str, cluster_queue_name: str) -> JSON:
    return {
        "apiVersion": API,
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": cluster_queue_name},
    }


def workload_priority_class(name: str, value: int) -> JSON:
    return {
        "apiVersion": API,
        "kind": "WorkloadPriorityClass",
        "metadata": {"name": name},
        "value": value,
        "description": "imagebatch tests",
    }


# -- queue objects in a cluster ----------------------------------------------------------------


@dataclass(frozen=True)
class TestQueues:
    """A test's own ResourceFlavor and ClusterQueue (cluster-scoped, so named after the test)
    and its LocalQueue in the test's namespace: jobs name `local_queue` in kueue.x-k8s.io/queue-name."""

    __test__ = False  # not a test class, despite the name

    namespace: str
    flavor: str
    cluster_queue: str
    local_queue: str
    low_priority: str = LOW_PRIORITY
    high_priority: str = HIGH_PRIORITY


def install_priority_classes(client: KubeClient) -> None:
    for name, value in PRIORITY_VALUES.items():
        path = f"/apis/{API}/workloadpriorityclasses/{name}"
        if client.get_or_none(path) is None:
            client.create(f"/apis/{API}/workloadpriorityclasses", workload_priority_class(name, value))


def _active(obj: JSON | None) -> bool:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Active" and c.get("status") == "True" for c in conditions)


def create_queues(client: KubeClient, namespace: str, quota: dict[str, str]) -> TestQueues:
    """Creates the queues and returns once Kueue reports the ClusterQueue and LocalQueue Active."""
    base = namespace[:50]
    queues = TestQueues(namespace, f"{base}-flavor", f"{base}-cq", "queue")
    client.create(f"/apis/{API}/resourceflavors", resource_flavor(queues.flavor))
    client.create(f"/apis/{API}/clusterqueues", cluster_queue(queues.cluster_queue, queues.flavor, quota))
    client.create(
        f"/apis/{API}/namespaces/{namespace}/localqueues",
        local_queue(namespace, queues.local_queue, queues.cluster_queue),
    )
    cq_path = f"/apis/{API}/clusterqueues/{queues.cluster_queue}"
    lq_path = f"/apis/{API}/namespaces/{namespace}/localqueues/{queues.local_queue}"
    wait_until(
        f"ClusterQueue {queues.cluster_queue} and LocalQueue {namespace}/{queues.local_queue} Active",
        lambda: _active(client.get_or_none(cq_path)) and _active(client.get_or_none(lq_path)),
        60,
    )
    return queues


def delete_queues(client: KubeClient, queues: TestQueues) -> None:
    """Deletes them without waiting (Kueue's finalizers go once nothing uses them)."""
    for path in (
        f"/apis/{API}/namespaces/{queues.namespace}/localqueues/{queues.local_queue}",
        f"/apis/{API}/clusterqueues/{queues.cluster_queue}",
        f"/apis/{API}/resourceflavors/{queues.flavor}",
    ):
        with contextlib.suppress(ApiError):
            client.delete(path)


def workloads(client: KubeClient, namespace: str) -> list[JSON]:
    items: list[JSON] = client.get(f"/apis/{API}/namespaces/{namespace}/workloads").get("items", [])
    return items


def workload_of_job(client: KubeClient, namespace: str, job_uid: str) -> JSON | None:
    """The Workload that Kueue made for a Job (owned by it), if any yet."""
    for wl in workloads(client, namespace):
        if any(ref.get("uid") == job_uid for ref in wl["metadata"].get("ownerReferences") or []):
            return wl
    return None


def workload_condition(wl: JSON | None, type_: str) -> JSON | None:
    for c in ((wl or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def admitted(wl: JSON | None) -> bool:
    return (workload_condition(wl, "Admitted") or {}).get("status") == "True"
