"""Acceptance (1): every file in examples/ applied to the cluster reaches Complete, with images and
manifest.jsonl in storage (a volume path and S3), progress columns and `kubectl wait`; and the
README's local-cluster section, run as written, completes every example with `submit --local`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
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


# -- the README's "Run the examples on the local cluster", command by command ---------------------

README_SECTION = "### Run the examples on the local cluster"
FOLDER_LINE = "export IMAGEBATCH_CLUSTER_DIR=/tmp/imagebatch-cluster"


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index(README_SECTION) :]
    block = section[section.index("```console\n") + len("```console\n") :]
    return [line for line in block[: block.index("```")].splitlines() if line.strip()]


def workdir_like_a_clone(tmp_path: Path) -> Path:
    """A folder that looks like the repository (links to what the commands use), so that what
    they write relative to it (fetch --to out/...) lands in the test's folder."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("Makefile", "pyproject.toml", "testing", "examples", "hack", "charts", "crds", ".venv"):
        (work / name).symlink_to(REPO / name)
    return work


@pytest.mark.timeout(1800)  # a cluster of its own, the chart, five jobs one after another
def test_the_readme_runs_every_example_on_the_local_cluster(tmp_path: Path) -> None:
    """cluster-up, helm install, `submit --local --wait` of every example, status, logs, fetch,
    cluster-down, as the README writes them; only the cluster's folder is the test's own."""
    commands = readme_commands()
    assert commands[0] == FOLDER_LINE and commands[-1] == "make cluster-down", commands
    examples = {p.name for p in (REPO / "examples").glob("*.yaml")}
    submitted = {c.split()[2].split("/")[-1] for c in commands if c.startswith("imagebatch submit ")}
    assert submitted == examples and all("--local --wait" in c for c in commands if "submit" in c)
    cluster_dir = tmp_path / "cluster"
    work = workdir_like_a_clone(tmp_path)
    body = [f"export IMAGEBATCH_CLUSTER_DIR={cluster_dir}", *commands[1:-1]]
    log = tmp_path / "readme.log"
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "IMAGEBATCH_CLUSTER_DIR")}
    try:
        with open(log, "w") as out:
            proc = subprocess.run(
                ["bash", "-euxo", "pipefail", "-c", "\n".join(body)],
                cwd=work,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=1500,
                check=False,
            )
        text = log.read_text()
        assert proc.returncode == 0, text[-6000:]
        volumes = cluster_dir / "volumes"
        # Each job said where its output went; all of it is in the cluster's folder, with its images.
        outputs = re.findall(r"--local: output\.uri \S+ -> (\S+)", text)
        assert len(outputs) == len(examples), text[-3000:]
        for uri in outputs:
            out = Path(uri)
            assert out.is_relative_to(volumes), uri
            lines = (out / "manifest.jsonl").read_text().splitlines()
            images = [p for p in (out / "images").iterdir()]
            assert lines and len(images) == len(lines), (uri, len(images), len(lines))
        assert text.count(": Complete; ") == len(examples)
        assert re.search(r"^volume-example\s+Complete", text, re.M), text[-3000:]  # imagebatch status
        assert re.search(r"^\[volume-example-\S+\] .* claimed ", text, re.M), text[
            -3000:
        ]  # the workers' logs
        fetched = work / "out" / "volume-example"
        assert len((fetched / "manifest.jsonl").read_text().splitlines()) == 12
        assert len(list((fetched / "images").glob("*.png"))) == 12
    finally:
        subprocess.run(
            ["bash", "-c", f"export IMAGEBATCH_CLUSTER_DIR={cluster_dir}; {commands[-1]}"],
            cwd=work,
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
