"""Acceptance (1): every file in examples/ applied to the cluster reaches Complete, with images and
manifest.jsonl in storage (a volume path and S3), progress columns and `kubectl wait`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from harness import REPO, Kubectl, Operator, example_docs, for_test_cluster, ibj, wait_condition

from imagebatch_testing.s3 import S3Server

pytestmark = pytest.mark.cluster


def test_every_example_completes(
    kubectl: Kubectl, running_operator: Operator, namespace: str, s3: S3Server, tmp_path: Path
) -> None:
    prompt_dir = tmp_path / "prompts"
    prompt_dir.mkdir()
    shutil.copy(REPO / "examples" / "prompts.txt", prompt_dir / "products.txt")
    s3.create_bucket("my-bucket")
    jobs: dict[str, dict] = {}  # type: ignore[type-arg]
    for fname, docs in example_docs():
        out = tmp_path / "out" / Path(fname).stem
        ready = []
        for original in docs:
            doc = original
            if doc["kind"] == "ImageBatchJob":
                doc = for_test_cluster(doc, out, s3.endpoint, prompt_dir)
                # Two workers at most: the whole suite shares two cores.
                w = doc["spec"]["workers"]
                w["maxReplicas"] = min(2, w.get("maxReplicas", 4))
                jobs[doc["metadata"]["name"]] = doc
            ready.append(doc)
        kubectl.apply(ready, namespace)
    assert len(jobs) >= 5, f"expected every example, got {sorted(jobs)}"

    for name in jobs:
        wait_condition(kubectl, namespace, name, "Complete", timeout=900)

    table = kubectl("get", "ibj", "-n", namespace).stdout
    header = table.splitlines()[0].split()
    assert header[:8] == ["NAME", "STATE", "REASON", "PROGRESS", "READY", "IMG/S", "ETA", "AGE"], table
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    for name, doc in jobs.items():
        status = ibj(kubectl, namespace, name)["status"]
        total = status["items"]["total"]
        assert total > 0 and status["items"]["done"] == total, status
        assert status["progress"] == f"{total}/{total}"
        assert rows[name][1:4] == ["Complete", "Completed", f"{total}/{total}"], rows[name]
        assert status["observedGeneration"] == 1
        out = doc["spec"]["output"]
        ext = {"png": "png", "webp": "webp", "jpeg": "jpg"}[out.get("format", "png")]
        if out["uri"].startswith("s3://"):
            bucket, _, prefix = out["uri"][5:].partition("/")
            keys = s3.keys(bucket, prefix)
            images = [k for k in keys if k.startswith(f"{prefix}/images/")]
            manifest = s3.get(bucket, f"{prefix}/manifest.jsonl").decode().splitlines()
        else:
            root = Path(out["uri"])
            images = [p.name for p in (root / "images").iterdir()]
            manifest = (root / "manifest.jsonl").read_text().splitlines()
        ids = [json.loads(line)["id"] for line in manifest]
        assert len(images) == len(ids) == len(set(ids)) == total, (name, len(images), len(ids), total)
        assert all(i.endswith("." + ext) for i in images)

    events = kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    for reason in ("CreatedShards", "ScaledUp", "Completed"):
        assert f'"reason": "{reason}"' in events
    metrics = running_operator.metrics()
    assert 'imagebatch_jobs{condition="Complete"}' in metrics
    assert "imagebatch_job_items" in metrics
