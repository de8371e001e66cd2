"""spec.model.cache on the control plane: the fetch init container fills the cache from a hub
that rate-limits its first two requests (retried, not failed), then the engine reads the cache
with HF_HUB_OFFLINE=1 and makes no hub request of its own.

The hub is a local fake (testing/imagebatch_testing/fakehub.py) serving the tiny pipeline saved with
save_pretrained. The node agent lays out a PersistentVolumeClaim volume as a folder of the pod,
so the test binds a real PVC (the scheduler waits for that) and points HF_HOME at the folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from harness import TINY_ENV, Kubectl, Operator, check_output_dir, tiny_job, wait_condition

from imagebatch_testing.fakehub import FakeHub
from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster

REPO = "test-org/tiny-sd"


def bound_claim(kubectl: Kubectl, namespace: str, name: str, folder: Path) -> None:
    """A PersistentVolume pre-bound to a claim of the namespace, and that claim."""
    cls = f"manual-{namespace}"
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"{namespace}-{name}"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": cls,
                "hostPath": {"path": str(folder)},
                "claimRef": {"namespace": namespace, "name": name},
            },
        }
    ]
    kubectl.apply(docs, namespace)
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": cls,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    kubectl.apply([claim], namespace)


def test_fetch_step_fills_the_cache_and_workers_run_offline(
    kube_cluster: TestCluster, kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    if kube_cluster.local is None:
        pytest.skip("the fake hub listens on this machine only")
    from imagebatch.worker.tiny import build_tiny_pipeline  # torch only in this test

    model = tmp_path / "repo"
    build_tiny_pipeline().save_pretrained(str(model))
    bound_claim(kubectl, namespace, "hf-cache", tmp_path / "pv")
    try:
        run_cached_job(kubectl, namespace, model, tmp_path / "out")
    finally:
        kubectl("delete", "pv", f"{namespace}-hf-cache", "--wait=false", check=False)


def run_cached_job(kubectl: Kubectl, namespace: str, model: Path, out: Path) -> None:
    hub = FakeHub(REPO, model, fail_first=2)
    with hub.running():
        env = [
            *TINY_ENV,
            {"name": "HF_ENDPOINT", "value": hub.url},
            {"name": "HF_HUB_DISABLE_XET", "value": "1"},
            # The node agent has no mounts: HF_HOME is the pod's folder for the cache volume.
            {"name": "HF_HOME", "value": "$(IMAGEBATCH_POD_DIR)/volumes/model-cache"},
        ]
        job = tiny_job(
            "cached",
            str(out),
            model={"name": REPO, "cache": {"claimName": "hf-cache"}},
            prompts=[f"a photo of object number {i}" for i in range(12)],
            workers={"maxReplicas": 1, "env": env},
        )
        kubectl.apply([job], namespace)
        wait_condition(kubectl, namespace, "cached", "Complete", timeout=600)
    lines = check_output_dir(out, {f"p{i:07d}" for i in range(12)})
    assert {line["model"] for line in lines} == {REPO}
    # Two rate limits, retried by the fetch step; the model's metadata was then read once, by
    # the fetch step: the engine, offline, asked the hub nothing.
    assert len([r for r in hub.requests if r[2] == 429]) == 2, hub.requests
    infos = [r for r in hub.requests if r[1] == f"/api/models/{REPO}" and r[2] == 200]
    assert len(infos) == 1, hub.requests
    # What the pods were made from: the worker Job's template (the pods themselves may be gone
    # by now: the job's end scales the Job to 0). A worker container starts only after its init
    # containers exited 0, so images made mean the fetch step succeeded.
    template = kubectl.json("get", "job", "cached-workers", "-n", namespace)["spec"]["template"]["spec"]
    assert [c["name"] for c in template["initContainers"]] == ["fetch-model"]
    worker_env = {e["name"]: e.get("value") for e in template["containers"][0]["env"]}
    assert worker_env["HF_HUB_OFFLINE"] == "1"
