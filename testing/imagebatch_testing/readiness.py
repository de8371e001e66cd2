"""What "ready" means for the local cluster and its namespaces, as states of the API to wait for."""

from __future__ import annotations

from typing import Any

from imagebatch_testing.kubeapi import KubeClient
from imagebatch_testing.processes import wait_until


def node_schedulable(node: dict[str, Any] | None) -> bool:
    if not node:
        return False
    taints = node.get("spec", {}).get("taints") or []
    if any(t.get("key") == "node.kubernetes.io/not-ready" for t in taints):
        return False
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def create_namespace(client: KubeClient, name: str, labels: dict[str, str] | None = None) -> None:
    """Creates a namespace and waits for its default ServiceAccount (pods need it)."""
    client.create(
        "/api/v1/namespaces", {"metadata": {"name": name, "labels": labels or {}}, "apiVersion": "v1"}
    )
    wait_until(
        f"the default ServiceAccount of namespace {name}",
        lambda: client.get_or_none(f"/api/v1/namespaces/{name}/serviceaccounts/default") is not None,
        60,
    )
