"""A worker lives through an API server that answers 429: the real kube-apiserver behind a fault
proxy (imagebatch_testing.faultproxy), a real kubernetes ApiClient through WorkerKube, the real
worker loop (watch-fed claims, builtin:tiny images, the manifest join)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from imagebatch.kubeclient import TimeoutApiClient
from imagebatch.names import ANNOTATION_MANIFEST_LINES
from imagebatch.shardplan import shard_manifests
from imagebatch.worker.cluster import Worker
from imagebatch.worker.kube import WorkerKube
from imagebatch_testing.cluster import build_binaries, create_namespace
from imagebatch_testing.faultproxy import Fault, FaultProxy
from imagebatch_testing.kubectl import Kubectl, install_crds
from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
JSON = dict[str, Any]


@pytest.fixture(scope="module")
def namespace(kube_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    k = Kubectl(build_binaries() / "kubectl", kube_cluster.kubeconfig, tmp_path_factory.mktemp("kubectl"))
    install_crds(k, REPO / "crds")
    name = f"retry-{uuid.uuid4().hex[:8]}"
    create_namespace(kube_cluster.client, name)
    yield name
    kube_cluster.client.delete(f"/api/v1/namespaces/{name}")


def through(proxy: FaultProxy) -> kubernetes.client.ApiClient:
    """A kubernetes client as the worker builds its own (no urllib3 retries), aimed at the proxy."""
    conf = kubernetes.client.Configuration()
    conf.host = proxy.url
    conf.retries = False
    return TimeoutApiClient(conf)


def test_a_prompt_config_map_answering_429_twice_does_not_fail_the_job(
    kube_cluster: TestCluster, namespace: str, tmp_path: Path
) -> None:
    client, ns, n = kube_cluster.client, namespace, 6
    client.create(
        f"/api/v1/namespaces/{ns}/configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "prompts"},
            "data": {"prompts.txt": "\n".join(f"a small drawing of thing {i}" for i in range(n))},
        },
    )
    job = client.create(
        f"/apis/imagebatch.dev/v1alpha1/namespaces/{ns}/imagebatchjobs",
        {
            "apiVersion": "imagebatch.dev/v1alpha1",
            "kind": "ImageBatchJob",
            "metadata": {"name": "cm"},
            "spec": {
                "model": {"name": "builtin:tiny"},
                "promptsFrom": {"configMapKeyRef": {"name": "prompts", "key": "prompts.txt"}},
                "generation": {"width": 32, "height": 32, "steps": 2},
                "batching": {"batchSize": 3, "shardSize": 3},
                "output": {"uri": str(tmp_path / "out")},
            },
        },
    )
    # The operator plans a ConfigMap's prompts; here the test does, with the same function.
    for shard in shard_manifests(job, n, 3):
        client.create(f"/apis/imagebatch.dev/v1alpha1/namespaces/{ns}/imagebatchshards", shard)

    cm_path = f"/api/v1/namespaces/{ns}/configmaps/prompts"
    fault = Fault("GET", cm_path, status=429, times=2, retry_after=1)
    with FaultProxy(client, [fault]) as proxy:
        worker = Worker(WorkerKube(ns, "cm", api=through(proxy)), "pod-a", threading.Event(), device="cpu")
        rc = worker.run()
        assert fault.served == 2 and proxy.seen("GET", cm_path) == 3, "two 429s, then the real answer"

    assert rc == 0
    shards = client.get(f"/apis/imagebatch.dev/v1alpha1/namespaces/{ns}/imagebatchshards")["items"]
    assert [s["status"]["state"] for s in shards] == ["Done", "Done"], [s.get("status") for s in shards]
    assert all(s["status"]["attempt"] == 1 and not s["status"].get("error") for s in shards)
    first = min(shards, key=lambda s: s["spec"]["index"])
    assert first["metadata"]["annotations"][ANNOTATION_MANIFEST_LINES] == str(n)
    lines = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == [f"p{i:07d}" for i in range(n)]
