"""The cluster CLI as a user runs it (a real subprocess, a real kubeconfig, the local control plane):
`imagebatch submit --wait` draws progress and exits 0 on Complete and 1 with reason and message on
Failed; submitting the same file again changes nothing; `fetch` copies exactly the job's files
from a volume and from S3; status, logs, suspend, resume, delete; `kubectl imagebatch` works."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import (
    Failpoints,
    Kubectl,
    Operator,
    condition,
    example_docs,
    for_test_cluster,
    ibj,
    tiny_job,
    wait_condition,
    wait_for,
)

from imagebatch_testing.s3 import S3Server

pytestmark = pytest.mark.cluster
BIN = Path(sys.executable).parent


def cli(kubectl: Kubectl, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # No AWS_* variables: S3 credentials come from the job's credentialsSecret, as on a laptop.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run(
        [str(BIN / "imagebatch"), *args],
        capture_output=True,
        text=True,
        env={**env, "KUBECONFIG": str(kubectl.kubeconfig)},
        timeout=timeout,
    )


def example(name: str, out: Path, s3_endpoint: str | None = None, **spec: Any) -> list[dict[str, Any]]:
    docs = dict(example_docs())[name]
    ready = []
    for original in docs:
        doc = original
        if doc["kind"] == "ImageBatchJob":
            doc = for_test_cluster(doc, out, s3_endpoint, out)
            doc["spec"]["workers"]["maxReplicas"] = 2  # the suite shares two cores
            for key, value in spec.items():
                doc["spec"][key] = {**doc["spec"].get(key, {}), **value}
        ready.append(doc)
    return ready


def following(argv: list[str], env: dict[str, str], wanted: str, timeout: float = 300) -> str:
    """The lines a following command (`logs -f`) printed until one held `wanted`; then stops it."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen: list[str] = []
    timer = threading.Timer(timeout, proc.kill)  # a safety net: the line is there long before
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if wanted in line:
                break
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
    return "".join(seen)


def write(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(docs))
    return path


def manifest_lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(x) for x in data.decode().splitlines() if x.strip()]


def applied_by_cli(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    job = kubectl.json("get", "ibj", name, "-n", namespace, "--show-managed-fields")
    return [m for m in job["metadata"]["managedFields"] if m["operation"] == "Apply"]


def test_submit_wait_resubmit_and_fetch_from_a_volume(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "volume"
    job = write(tmp_path / "volume.yaml", example("volume.yaml", out))
    r = cli(kubectl, "submit", str(job), "--wait", "-n", namespace)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "imagebatchjob.imagebatch.dev/volume-example configured" in r.stdout
    # The progress bar, drawn from the status: a bar, done/total, workers and the final state.
    assert "/12 images" in r.stderr and "workers" in r.stderr, r.stderr
    assert "[##############################] 12/12 images (100%)" in r.stderr and "| Complete" in r.stderr
    assert "volume-example: Complete; 12 images" in r.stdout
    before = ibj(kubectl, namespace, "volume-example")
    assert condition(before, "Complete") is not None
    applied_before = applied_by_cli(kubectl, namespace, "volume-example")
    assert [m["manager"] for m in applied_before] == ["imagebatch-cli"]  # server-side apply, our manager

    again = cli(kubectl, "submit", str(job), "--wait", "-n", namespace)
    assert again.returncode == 0, again.stderr
    assert "volume-example unchanged" in again.stdout
    after = ibj(kubectl, namespace, "volume-example")
    # The operator's status writes may move the resourceVersion; the spec, its generation and our
    # apply's managed-fields entry (its time changes with any change we make) do not move.
    assert after["metadata"]["generation"] == before["metadata"]["generation"] == 1
    assert after["spec"] == before["spec"]
    assert applied_by_cli(kubectl, namespace, "volume-example") == applied_before

    dest = tmp_path / "fetched"
    f = cli(kubectl, "fetch", "volume-example", "--to", str(dest), "-n", namespace)
    assert f.returncode == 0, f.stderr
    src = out / "volume-example"
    lines = manifest_lines((src / "manifest.jsonl").read_bytes())
    assert (dest / "manifest.jsonl").read_bytes() == (src / "manifest.jsonl").read_bytes()
    fetched_images = sorted(str(p.relative_to(dest)) for p in (dest / "images").iterdir())
    assert fetched_images == sorted(line["key"] for line in lines)  # exactly the manifest's images
    for line in lines:
        assert (dest / line["key"]).read_bytes() == (src / line["key"]).read_bytes()
    for extra in ("index.html", "manifest.parquet", "metadata.jsonl", "contact/sheet.js"):
        assert (dest / extra).read_bytes() == (src / extra).read_bytes()
    assert not list(dest.rglob("*.tmp-*"))
    resumed = cli(kubectl, "fetch", "volume-example", "--to", str(dest), "-n", namespace)
    assert resumed.returncode == 0 and " 0 copied" in resumed.stdout, resumed.stdout

    table = cli(kubectl, "status", "-n", namespace)
    assert table.returncode == 0, table.stderr
    assert table.stdout.split()[:7] == ["NAME", "STATE", "PROGRESS", "IMG/S", "ETA", "WORKERS", "AGE"]
    assert "volume-example   Complete   12/12" in table.stdout
    as_json = json.loads(cli(kubectl, "status", "volume-example", "-o", "json", "-n", namespace).stdout)
    assert as_json["status"]["items"]["done"] == 12

    # The same binary as a kubectl plugin: kubectl finds kubectl-imagebatch on PATH.
    plugin = subprocess.run(
        [str(kubectl.binary), "imagebatch", "status", "-n", namespace],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": str(kubectl.kubeconfig), "PATH": f"{BIN}:{os.environ['PATH']}"},
        timeout=600,
    )
    assert plugin.returncode == 0, plugin.stderr
    assert "volume-example   Complete   12/12" in plugin.stdout


def test_failed_job_exits_1_with_reason_and_message(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    job = tiny_job(
        "no-model",
        str(tmp_path / "out"),
        model={"name": "/models/does-not-exist"},
        prompts=[f"prompt {i}" for i in range(8)],
        workers={"maxReplicas": 1},
    )
    r = cli(kubectl, "submit", str(write(tmp_path / "job.yaml", [job])), "--wait", "-n", namespace)
    assert r.returncode == 1, r.stdout + r.stderr
    failed = condition(ibj(kubectl, namespace, "no-model"), "Failed")
    assert failed is not None
    assert f"error: ImageBatchJob no-model failed: {failed['reason']}: {failed['message']}" in r.stderr
    assert "ModelLoadError" in r.stderr and "does-not-exist" in r.stderr


def test_webdataset_job_on_s3_is_fetched_exactly(
    kubectl: Kubectl, running_operator: Operator, namespace: str, s3: S3Server, tmp_path: Path
) -> None:
    s3.create_bucket("my-bucket")
    # The example file as it is (the Secret too: submit applies every document), on the test's S3.
    docs = example("s3.yaml", tmp_path, s3.endpoint, output={"layout": "webdataset"})
    r = cli(kubectl, "submit", str(write(tmp_path / "s3.yaml", docs)), "--wait", "-n", namespace)
    assert r.returncode == 0, r.stdout + r.stderr
    assert kubectl("get", "secret", "imagebatch-s3", "-n", namespace, check=False).returncode == 0
    uri = next(d for d in docs if d["kind"] == "ImageBatchJob")["spec"]["output"]["uri"]
    bucket, _, prefix = uri[5:].partition("/")
    assert bucket == "my-bucket"
    prefix = prefix.rstrip("/")
    manifest = s3.get("my-bucket", f"{prefix}/manifest.jsonl")
    lines = manifest_lines(manifest)
    assert len(lines) == 16 and {line["key"] for line in lines} == {f"shards/s{i:05d}.tar" for i in range(4)}
    assert not [k for k in s3.keys("my-bucket", prefix) if "/images/" in k]  # one object per shard

    dest = tmp_path / "fetched"
    f = cli(kubectl, "fetch", "s3-example", "--to", str(dest), "-n", namespace)
    assert f.returncode == 0, f.stderr
    assert (dest / "manifest.jsonl").read_bytes() == manifest
    assert sorted(str(p.relative_to(dest)) for p in (dest / "shards").iterdir()) == sorted(
        {line["key"] for line in lines}
    )
    members: dict[str, bytes] = {}
    for tar_key in {line["key"] for line in lines}:
        data = (dest / tar_key).read_bytes()
        assert data == s3.get("my-bucket", f"{prefix}/{tar_key}")
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            members.update({m.name: t.extractfile(m).read() for m in t.getmembers()})  # type: ignore[union-attr]
    assert sorted(members) == sorted(
        [f"{line['id']}.webp" for line in lines] + [f"{line['id']}.json" for line in lines]
    )
    assert (dest / "index.html").exists() and (dest / "manifest.parquet").exists()


def test_status_logs_suspend_resume_delete(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    # The worker holds after its first shard until it is stopped: the job is still running when
    # it is suspended, however fast the machine.
    fail = Failpoints(tmp_path / "failpoints")
    job = tiny_job(
        "steps",
        str(tmp_path / "out"),
        prompts=[f"a photo of object number {i}" for i in range(400)],
        generation={"steps": 20},
        batching={"batchSize": 8, "shardSize": 50},
        workers={"maxReplicas": 1, "env": fail.env("shard-done@1=hold")},
    )
    r = cli(kubectl, "submit", str(write(tmp_path / "job.yaml", [job])), "-n", namespace)
    assert r.returncode == 0 and "steps configured" in r.stdout, r.stderr

    def some_done() -> bool:
        return bool((ibj(kubectl, namespace, "steps").get("status") or {}).get("items", {}).get("done"))

    fail.wait("shard-done")
    wait_for("the first images", some_done, timeout=600)
    # The workers' own lines, each prefixed by its pod, for exactly the job's worker pods: the API
    # server reads them from the node agent's kubelet API, as from a kubelet.
    pods = {p["metadata"]["name"] for p in kubectl.json("get", "pods", "-n", namespace)["items"]}
    logs = cli(kubectl, "logs", "steps", "-n", namespace)
    assert logs.returncode == 0, logs.stderr
    named = {line.split("]")[0][1:] for line in logs.stdout.splitlines() if line.startswith("[")}
    assert named and named <= pods and all(n.startswith("steps-workers-") for n in named), logs
    assert re.search(r"^\[steps-workers-\S+\] .* claimed steps-", logs.stdout, re.M), logs.stdout
    # -f follows the running (held) worker: its lines come while it runs, and kubectl's the same.
    (pod,) = named
    for argv in (
        [str(BIN / "imagebatch"), "logs", "steps", "-f", "-n", namespace],
        [str(kubectl.binary), "logs", "-f", pod, "-n", namespace],
    ):
        first = following(argv, {**os.environ, "KUBECONFIG": str(kubectl.kubeconfig)}, "claimed steps-")
        assert "claimed steps-" in first, (argv, first)

    s = cli(kubectl, "suspend", "steps", "-n", namespace)
    assert s.returncode == 0 and "steps suspended" in s.stdout, s.stderr
    wait_condition(kubectl, namespace, "steps", "Suspended", timeout=600)
    assert ibj(kubectl, namespace, "steps")["spec"]["suspend"] is True
    assert "Suspended" in cli(kubectl, "status", "steps", "-n", namespace).stdout

    fail.release()  # the resumed job's workers run through
    assert cli(kubectl, "resume", "steps", "-n", namespace).returncode == 0
    w = cli(kubectl, "wait", "steps", "-n", namespace)
    assert w.returncode == 0, w.stderr
    assert "steps: Complete; 400 images" in w.stdout

    d = cli(kubectl, "delete", "steps", "-n", namespace)
    assert d.returncode == 0, d.stderr
    wait_for(
        "the job to be gone",
        lambda: kubectl("get", "ibj", "steps", "-n", namespace, check=False).returncode != 0,
        timeout=600,
    )
    missing = cli(kubectl, "status", "steps", "-n", namespace)
    assert missing.returncode == 2 and "no ImageBatchJob 'steps'" in missing.stderr


def test_a_job_deleted_under_wait_says_so_and_fetch_names_its_flag(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    fail = Failpoints(tmp_path / "failpoints")
    job = tiny_job(
        "gone",
        str(tmp_path / "out"),
        prompts=[f"prompt {i}" for i in range(40)],
        workers={"maxReplicas": 1, "env": fail.env("image-stored@1=hold")},
    )
    path = write(tmp_path / "job.yaml", [job])
    env = {**os.environ, "KUBECONFIG": str(kubectl.kubeconfig)}
    waiting = subprocess.Popen(
        [str(BIN / "imagebatch"), "submit", str(path), "--wait", "-n", namespace],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        fail.wait("image-stored")  # the job runs and --wait has seen it
        wait_for("the job's first status", lambda: ibj(kubectl, namespace, "gone").get("status") or {}, 300)
        kubectl("delete", "ibj", "gone", "-n", namespace, "--wait=false")
        out, err = waiting.communicate(timeout=300)
    finally:
        fail.release()
        waiting.kill()
    assert waiting.returncode == 1, out + err
    assert "error: ImageBatchJob gone was deleted before it completed" in err, err

    kubectl.apply([tiny_job("here", str(tmp_path / "out2"), prompts=["one"])], namespace)
    wrong = cli(
        kubectl, "fetch", "here", "--to", str(tmp_path / "d"), "--from", "/no/such/dir", "-n", namespace
    )
    assert wrong.returncode != 0 and "--from '/no/such/dir': no such folder on this machine" in wrong.stderr
    assert "spec.output.uri" not in wrong.stderr
