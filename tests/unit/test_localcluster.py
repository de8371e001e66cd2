"""`imagebatch submit --local` (imagebatch/localcluster.py): every example becomes a valid job
for the local test cluster, its volume paths and outputs mapped to folders under the cluster's
own folder, on the CPU with one torch thread per worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from imagebatch.jobfile import parse_job
from imagebatch.localcluster import LOCAL_VOLUME, for_local_cluster, volumes_root

REPO = Path(__file__).resolve().parents[2]
ROOT = "/tmp/c/volumes"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def job_of(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return next(d for d in docs if d["kind"] == "ImageBatchJob")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_becomes_a_valid_cpu_job_under_the_cluster_folder(path: Path) -> None:
    local, changes = for_local_cluster(job_of(path), ROOT)
    spec = parse_job(local).spec  # the API's own validation
    assert spec.model.name.startswith("builtin:")
    assert spec.workers.gpus_per_worker == 0 and spec.workers.max_replicas <= 2
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in local["spec"]["workers"]["env"]
    assert spec.output.uri.startswith(ROOT + "/"), spec.output.uri
    volumes = local["spec"]["workers"]["volumes"]
    assert not [v for v in volumes if "persistentVolumeClaim" in v]
    assert {"name": LOCAL_VOLUME, "hostPath": {"path": ROOT, "type": "DirectoryOrCreate"}} in volumes
    assert {"name": LOCAL_VOLUME, "mountPath": ROOT} in local["spec"]["workers"]["volumeMounts"]
    if spec.prompts_from is not None and spec.prompts_from.uri:
        assert spec.prompts_from.uri.startswith(ROOT + "/")
    assert all(isinstance(c, str) for c in changes)


def test_paths_on_a_claim_are_mapped_as_its_mount_is() -> None:
    local, changes = for_local_cluster(job_of(REPO / "examples/prompts-file.yaml"), ROOT)
    spec = local["spec"]
    assert spec["output"]["uri"] == f"{ROOT}/imagebatch-output/prompts-file-example"
    assert spec["promptsFrom"]["uri"] == f"{ROOT}/imagebatch-output/prompts/products.txt"
    assert "volume data (claim imagebatch-output) at /data -> /tmp/c/volumes/imagebatch-output" in changes
    assert (spec["generation"]["width"], spec["batching"]["batchSize"]) == (64, 8)


def test_s3_and_relative_outputs_go_to_folders_of_their_own() -> None:
    s3, _ = for_local_cluster(job_of(REPO / "examples/s3.yaml"), ROOT)
    assert s3["spec"]["output"]["uri"] == f"{ROOT}/s3/my-bucket/imagebatch/s3-example"
    assert "credentialsSecret" not in s3["spec"]["output"]
    quick, _ = for_local_cluster(job_of(REPO / "examples/quickstart.yaml"), ROOT)
    assert quick["spec"]["output"]["uri"] == f"{ROOT}/paths/out/quickstart"
    assert quick["spec"]["generation"]["width"] == 64  # builtin:tiny keeps its own settings


def test_a_threads_setting_of_the_job_is_kept_and_the_root_follows_the_cluster_dir() -> None:
    doc = job_of(REPO / "examples/volume.yaml")
    doc["spec"]["workers"]["env"] = [{"name": "OMP_NUM_THREADS", "value": "2"}]
    local, _ = for_local_cluster(doc, ROOT)
    assert local["spec"]["workers"]["env"] == [{"name": "OMP_NUM_THREADS", "value": "2"}]
    assert volumes_root({"IMAGEBATCH_CLUSTER_DIR": "/x"}) == "/x/volumes"
    assert volumes_root({}) == "/tmp/imagebatch-cluster/volumes"
