"""What GitOps tools make of live ImageBatchJobs, read with their own code: kstatus
(sigs.k8s.io/cli-utils, Flux's health checks) and the Argo CD health check shipped in
resource_customizations/ run by gopher-lua (Argo CD's interpreter), both in hack/gitops's tool.

Jobs in every state on the local cluster: Running (a worker held mid-shard), Queued (Kueue has no
quota for it), Suspended, Complete, Failed, being deleted (a finalizer of the test's keeps it),
and a spec the operator has not observed yet (the operator stopped). With
IMAGEBATCH_GITOPS_CAPTURE=DIR the objects are also written there: that is where
resource_customizations/.../testdata/ came from (tests/unit/test_gitops.py reads those)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import REPO, Failpoints, Kubectl, Operator, condition, ibj, tiny_job, wait_condition, wait_for

from imagebatch_testing.kueuequeues import TestQueues

pytestmark = pytest.mark.cluster
HEALTH = REPO / "resource_customizations" / "imagebatch.dev" / "ImageBatchJob"
FINALIZER = "imagebatch.dev/test-holds-deletion"
JSON = dict[str, Any]

# state -> (kstatus, Argo CD health): what docs/operator.md ("GitOps") says.
EXPECTED = {
    "running": ("InProgress", "Progressing"),
    "queued": ("Current", "Suspended"),
    "suspended": ("Current", "Suspended"),
    "complete": ("Current", "Healthy"),
    "failed": ("Failed", "Degraded"),
    "deleting": ("Terminating", "Progressing"),
    "stale-generation": ("InProgress", "Progressing"),
}


def gitops_tool() -> Path:
    proc = subprocess.run(
        ["bash", str(REPO / "hack/gitops/build.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def clean(obj: JSON) -> JSON:
    """The object as `kubectl get -o yaml` shows it, less what only this cluster means."""
    meta = obj["metadata"]
    for key in ("managedFields", "uid", "resourceVersion", "annotations"):
        meta.pop(key, None)
    return obj


def read_all(tool: Path, folder: Path, objects: dict[str, JSON]) -> dict[str, tuple[str, str]]:
    """{state: (kstatus, Argo CD health)} of the objects, each read by the real code."""
    for state, obj in objects.items():
        (folder / f"{state}.yaml").write_text(yaml.safe_dump(obj))
    paths = [str(folder / f"{s}.yaml") for s in objects]
    ks = subprocess.run([str(tool), "kstatus", *paths], capture_output=True, text=True, check=True)
    kstatus = {Path(r["path"]).stem: r["status"] for r in map(json.loads, ks.stdout.splitlines())}
    tests = {
        "tests": [
            {"healthStatus": {"status": "?", "message": "?"}, "inputPath": f"{s}.yaml"} for s in objects
        ]
    }
    (folder / "health_test.yaml").write_text(yaml.safe_dump(tests))
    (folder / "health.lua").write_text((HEALTH / "health.lua").read_text())
    argo = subprocess.run([str(tool), "argocd", str(folder)], capture_output=True, text=True, check=False)
    results = [json.loads(line) for line in argo.stdout.splitlines()]
    assert all("error" not in r for r in results), results  # a script error is not a health
    argocd = {Path(r["path"]).stem: r["got"]["status"] for r in results}
    return {s: (kstatus[s], argocd[s]) for s in objects}


def test_kstatus_and_argocd_read_every_state_of_live_jobs(
    kubectl: Kubectl,
    running_operator: Operator,
    namespace: str,
    kueue_queues: TestQueues,
    tmp_path: Path,
) -> None:
    tool = gitops_tool()
    hold = Failpoints(tmp_path / "failpoints")
    out = tmp_path / "out"
    prompts = [f"a lighthouse at dusk, variation {i}" for i in range(40)]
    jobs = [
        tiny_job(
            "running",
            str(out / "r"),
            prompts=prompts,
            workers={"maxReplicas": 1, "env": hold.env("image-stored@1=hold")},
        ),
        tiny_job("complete", str(out / "c"), prompts=prompts[:4]),
        tiny_job("failed", str(out / "f"), prompts=prompts[:4], model={"name": "/models/does-not-exist"}),
        tiny_job("suspended", str(out / "s"), prompts=prompts[:4], suspend=True),
        tiny_job(
            "queued",
            str(out / "q"),
            prompts=prompts[:4],
            queueName=kueue_queues.local_queue,
            workers={"maxReplicas": 1, "resources": {"requests": {"cpu": "600m"}}},  # above the 500m quota
        ),
        tiny_job("deleting", str(out / "d"), prompts=prompts[:4]),
        tiny_job("stale-generation", str(out / "g"), prompts=prompts[:4]),
    ]
    jobs[5]["metadata"]["finalizers"] = [FINALIZER]
    kubectl.apply(jobs, namespace)
    try:
        for name in ("complete", "deleting", "stale-generation"):
            wait_condition(kubectl, namespace, name, "Complete", timeout=600)
        wait_condition(kubectl, namespace, "failed", "Failed", timeout=600)
        hold.wait("image-stored")
        for name, kind in (("suspended", "Suspended"), ("queued", "Queued")):
            wait_for(
                f"{name} {kind}",
                lambda n=name, k=kind: (
                    (condition(ibj(kubectl, namespace, n), k) or {}).get("status") == "True"
                ),
                timeout=300,
            )
        wait_for(
            "running reports its first image",
            lambda: (
                (ibj(kubectl, namespace, "running").get("status") or {}).get("items", {}).get("done", 0) > 0
            ),
            timeout=300,
        )
        kubectl("delete", "ibj", "deleting", "-n", namespace, "--wait=false")
        running_operator.stop()  # nobody observes the next spec change
        kubectl(
            "patch",
            "ibj",
            "stale-generation",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            '{"spec": {"workers": {"maxReplicas": 3}}}',
        )
        objects = {
            job["metadata"]["name"]: clean(ibj(kubectl, namespace, job["metadata"]["name"])) for job in jobs
        }
    finally:
        kubectl(
            "patch",
            "ibj",
            "deleting",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            '{"metadata": {"finalizers": null}}',
            check=False,
        )
        hold.release()
        running_operator.start()
    assert objects["deleting"]["metadata"].get("deletionTimestamp")
    stale = objects["stale-generation"]
    assert stale["status"]["observedGeneration"] < stale["metadata"]["generation"]
    capture = os.environ.get("IMAGEBATCH_GITOPS_CAPTURE")
    if capture:
        Path(capture).mkdir(parents=True, exist_ok=True)
        for state, obj in objects.items():
            (Path(capture) / f"{state}.yaml").write_text(yaml.safe_dump(obj))
    folder = tmp_path / "read"
    folder.mkdir()
    assert read_all(tool, folder, objects) == EXPECTED
