"""A real kube-apiserver accepts the generated CRDs and refuses bad ImageBatchJobs with messages that
name the field (what `kubectl apply` users see)."""

from __future__ import annotations

import copy
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagebatch_testing.cluster import build_binaries, create_namespace
from imagebatch_testing.kubectl import Kubectl, install_crds
from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
JSON = dict[str, Any]


@pytest.fixture(scope="module")
def kubectl(kube_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    """kubectl on the test cluster, with the CRDs applied, Established and published."""
    k = Kubectl(
        build_binaries() / "kubectl", kube_cluster.kubeconfig, tmp_path_factory.mktemp("kubectl-cache")
    )
    install_crds(k, REPO / "crds")
    wait_published(k)
    return k


def wait_published(k: Kubectl, timeout: float = 300) -> None:
    """Established is not the end: discovery and the OpenAPI document (explain) follow a bit later."""
    deadline = time.monotonic() + timeout
    while True:
        checks = [
            k(*args, check=False) for args in (("get", "ibj,ibs", "-A"), ("explain", "ibj.spec.generation"))
        ]
        if all(c.returncode == 0 for c in checks) and "Generation defaults" in checks[1].stdout:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"CRDs not published in {timeout} s: {[c.stderr for c in checks]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def namespace(kube_cluster: TestCluster, kubectl: Kubectl) -> Iterator[str]:
    name = f"crd-{uuid.uuid4().hex[:8]}"
    create_namespace(kube_cluster.client, name)
    yield name
    kube_cluster.client.delete(f"/api/v1/namespaces/{name}")


def good_job(name: str = "") -> JSON:
    return {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatchJob",
        "metadata": {"name": name} if name else {"generateName": "job-"},
        "spec": {
            "model": {"name": "builtin:tiny"},
            "promptItems": [
                {"prompt": "a lighthouse at dawn"},
                {"id": "fox", "prompt": "a fox", "seed": 7, "width": 96},
            ],
            "generation": {"width": 64, "height": 64, "steps": 4},
            "batching": {"batchSize": 8, "shardSize": 4},
            "output": {"uri": "out/crd-test"},
        },
    }


def create(kubectl: Kubectl, namespace: str, doc: JSON, *extra: str) -> subprocess.CompletedProcess[str]:
    return kubectl(
        "create", "-n", namespace, "-o", "json", *extra, "-f", "-", input=json.dumps(doc), check=False
    )


def test_crds_are_established(kubectl: Kubectl) -> None:
    for name in ("imagebatchjobs.imagebatch.dev", "imagebatchshards.imagebatch.dev"):
        crd = json.loads(kubectl("get", "crd", name, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", conditions
        assert conditions.get("NamesAccepted") == "True", conditions
        assert conditions.get("NonStructuralSchema") != "True", conditions
    resources = kubectl("api-resources", "--api-group=imagebatch.dev", "-o", "wide").stdout
    assert "ibj" in resources and "ibs" in resources and "imagebatch" in resources


def test_explain_reads_the_descriptions(kubectl: Kubectl) -> None:
    def explain(what: str) -> str:  # kubectl wraps lines: compare with single spaces
        return " ".join(kubectl("explain", what).stdout.replace("\t", " TAB ").split())

    text = explain("ibj.spec.generation")
    assert "Generation defaults" in text and "Immutable after creation" in text
    assert "a multiple of 8" in text and "Denoising steps" in text
    text = explain("ibj.spec.promptItems")
    assert "promptsFrom" in text and "prompt TAB <string> -required-" in text
    assert "kubectl wait --for=condition=Complete" in explain("ibj")
    assert "the unit a worker claims" in explain("ibs")
    assert "Immutable after creation" in explain("ibj.spec.output.uri")


def test_good_job_gets_defaults(kubectl: Kubectl, namespace: str) -> None:
    proc = create(kubectl, namespace, good_job())
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["spec"]
    assert spec["generation"]["guidanceScale"] == 7.5 and spec["generation"]["imagesPerPrompt"] == 1
    assert spec["workers"] == {
        "minReplicas": 0,
        "maxReplicas": 4,
        "shardsPerReplica": 2,
        "gpusPerWorker": 1,
        "terminationGracePeriodSeconds": 30,
    }
    assert spec["output"]["format"] == "png" and spec["retries"]["maxAttempts"] == 3
    assert spec["promptItems"][1] == {"id": "fox", "prompt": "a fox", "seed": 7, "width": 96}
    # The stored spec is one the models accept unchanged.
    from imagebatch.api import ImageBatchJobSpec

    ImageBatchJobSpec.model_validate(spec)


def test_examples_are_accepted(kubectl: Kubectl, namespace: str) -> None:
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ImageBatchJob":
                doc["metadata"] = {"generateName": "example-"}
                proc = create(kubectl, namespace, doc, "--dry-run=server")
                assert proc.returncode == 0, f"{path}: {proc.stderr}"


def _set(path: str, value: Any) -> Callable[[JSON], None]:
    def change(spec: JSON) -> None:
        *parents, last = path.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return change


def _delete(name: str) -> Callable[[JSON], None]:
    return lambda spec: spec.pop(name)


def _strings(prompts: list[Any]) -> Callable[[JSON], None]:
    """The job with inline prompt strings (spec.prompts) instead of its promptItems."""

    def change(spec: JSON) -> None:
        spec.pop("promptItems")
        spec["prompts"] = prompts

    return change


BAD: list[tuple[str, Callable[[JSON], None], list[str]]] = [
    # (case, change to the spec, every one of these must be in kubectl's message)
    ("unknown field", _set("generation.widht", 512), ['unknown field "spec.generation.widht"']),
    ("width not a multiple of 8", _set("generation.width", 100), ["spec.generation.width", "multiple of 8"]),
    ("steps 0", _set("generation.steps", 0), ["spec.generation.steps", "greater than or equal to 1"]),
    ("empty prompts", _set("promptItems", []), ["spec.promptItems", "at least 1 item"]),
    ("empty prompt string", _strings(["a", ""]), ["spec.prompts[1]", "at least 1 chars"]),
    (
        "prompt object in prompts",
        _strings(["a", {"prompt": "b"}]),
        ["spec.prompts[1]"],
    ),
    (
        "prompt object without prompt",
        _set("promptItems", [{"id": "x"}]),
        ["spec.promptItems[0].prompt", "Required"],
    ),
    (
        "prompt override width",
        _set("promptItems", [{"prompt": "x", "width": 100}]),
        ["spec.promptItems[0].width", "multiple of 8"],
    ),
    (
        "bad prompt id",
        _set("promptItems", [{"prompt": "x", "id": "-x"}]),
        ["spec.promptItems[0].id", "should match"],
    ),
    (
        "unknown prompt field",
        _set("promptItems", [{"prompt": "x", "deep": {"a": 1}}]),
        ['unknown field "spec.promptItems[0].deep"'],
    ),
    ("oversized prompt", _strings(["x" * 5000]), ["spec.prompts[0]", "Too long", "4096"]),
    ("too many prompts", _strings(["x"] * 10_001), ["spec.prompts", "Too many", "10000"]),
    (
        "seed not a number",
        _set("promptItems", [{"prompt": "x", "seed": {"a": [1]}}]),
        ["spec.promptItems[0].seed"],
    ),
    (
        "reserved env name",
        _set("workers", {"env": [{"name": "JOB_UID", "value": "x"}]}),
        ["spec.workers.env[0]", "JOB_UID is set by the operator", "may not be overridden"],
    ),
    (
        "reserved env prefix",
        _set("workers", {"env": [{"name": "IMAGEBATCH_GPUS", "value": "9"}]}),
        ["IMAGEBATCH_GPUS is set by the operator"],
    ),
    (
        "unknown env field",
        _set("workers", {"env": [{"name": "A", "value": "x", "nested": {"b": {"c": 1}}}]}),
        ['unknown field "spec.workers.env[0].nested"'],
    ),
    (
        "volume with two sources",
        _set(
            "workers",
            {"volumes": [{"name": "v", "emptyDir": {}, "persistentVolumeClaim": {"claimName": "c"}}]},
        ),
        ["spec.workers.volumes[0]", "exactly one volume source"],
    ),
    (
        "volume of an unknown source",
        _set("workers", {"volumes": [{"name": "v", "projected": {"sources": []}}]}),
        ['unknown field "spec.workers.volumes[0].projected"'],
    ),
    (
        "both prompts and promptsFrom",
        _set("promptsFrom", {"uri": "s3://b/p.txt"}),
        [
            "spec.promptsFrom",
            "set inline prompts (spec.prompts, spec.promptItems) or spec.promptsFrom, not both",
        ],
    ),
    (
        "no prompt source",
        _delete("promptItems"),
        ["spec", "set spec.prompts (strings) and/or spec.promptItems"],
    ),
    (
        "promptsFrom with uri and configMapKeyRef",
        lambda s: (
            s.pop("promptItems"),
            s.update(promptsFrom={"uri": "a", "configMapKeyRef": {"name": "c", "key": "k"}}),
        ),
        ["spec.promptsFrom", "exactly one of spec.promptsFrom.uri"],
    ),
    (
        "minReplicas > maxReplicas",
        _set("workers", {"minReplicas": 5, "maxReplicas": 2}),
        ["spec.workers.minReplicas", "must not exceed spec.workers.maxReplicas"],
    ),
    ("batchSize 0", _set("batching.batchSize", 0), ["spec.batching.batchSize", "from 1 to 1024, or auto"]),
    ("batchSize word", _set("batching.batchSize", "big"), ["spec.batching.batchSize", "or auto"]),
    ("output format", _set("output.format", "gif"), ["spec.output.format", "supported values"]),
    ("model without name", _set("model", {}), ["spec.model.name", "Required"]),
    (
        "maxFailedItems word",
        _set("retries", {"maxFailedItems": "some"}),
        ["spec.retries.maxFailedItems", "percentage"],
    ),
    (
        "maxFailedItems over 100%",
        _set("retries", {"maxFailedItems": "150%"}),
        ["spec.retries.maxFailedItems"],
    ),
    ("maxFailedItems negative", _set("retries", {"maxFailedItems": -1}), ["spec.retries.maxFailedItems"]),
]


@pytest.mark.parametrize(("case", "change", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_manifest_is_refused(
    kubectl: Kubectl, namespace: str, case: str, change: Callable[[JSON], None], expected: list[str]
) -> None:
    doc = good_job()
    change(doc["spec"])
    proc = create(kubectl, namespace, doc)
    assert proc.returncode != 0, f"{case}: accepted: {proc.stdout[:500]}"
    for text in expected:
        assert text in proc.stderr, f"{case}: {text!r} not in {proc.stderr!r}"


def test_unknown_fields_are_pruned_without_strict_validation(kubectl: Kubectl, namespace: str) -> None:
    """kubectl asks for fieldValidation=Strict by default (so typos are refused, above); other
    clients that do not get the field dropped (pruned), never stored."""
    doc = good_job()
    doc["spec"]["generation"]["widht"] = 512
    proc = create(kubectl, namespace, doc, "--validate=false")
    assert proc.returncode == 0, proc.stderr
    assert "widht" not in json.loads(proc.stdout)["spec"]["generation"]


@pytest.fixture
def job(kubectl: Kubectl, namespace: str) -> str:
    name = f"imm-{uuid.uuid4().hex[:6]}"
    proc = create(kubectl, namespace, good_job(name))
    assert proc.returncode == 0, proc.stderr
    return name


IMMUTABLE: list[tuple[JSON, str]] = [
    ({"generation": {"steps": 30}}, "spec.generation is immutable"),
    ({"model": {"revision": "main"}}, "spec.model is immutable"),
    ({"output": {"uri": "elsewhere"}}, "spec.output.uri is immutable"),
    ({"output": {"format": "webp"}}, "spec.output.format is immutable"),
    ({"output": {"quality": 50}}, "spec.output.quality is immutable"),
    ({"batching": {"shardSize": 2}}, "spec.batching.shardSize is immutable"),
    ({"promptItems": None, "promptsFrom": {"uri": "p.txt"}}, "cannot be added or removed"),
    ({"promptItems": [{"prompt": "another"}]}, "spec.promptItems is immutable"),
]


@pytest.mark.parametrize(("patch", "message"), IMMUTABLE, ids=[m for _, m in IMMUTABLE])
def test_changing_what_decides_the_images_is_refused(
    kubectl: Kubectl, namespace: str, job: str, patch: JSON, message: str
) -> None:
    proc = kubectl(
        "patch", "-n", namespace, "ibj", job, "--type=merge", "-p", json.dumps({"spec": patch}), check=False
    )
    assert proc.returncode != 0, f"accepted: {patch}"
    assert message in proc.stderr and "create a new ImageBatchJob" in proc.stderr, proc.stderr


def test_operational_fields_stay_mutable(kubectl: Kubectl, namespace: str, job: str) -> None:
    patch = {
        "spec": {
            "suspend": True,
            "queueName": "team-a",
            "workers": {"maxReplicas": 8, "minReplicas": 1},
            "batching": {"batchSize": "auto"},
            "retries": {"maxAttempts": 5},
            "output": {"credentialsSecret": {"name": "s3"}, "endpointUrl": "http://minio:9000"},
            "activeDeadlineSeconds": 3600,
        }
    }
    kubectl("patch", "-n", namespace, "ibj", job, "--type=merge", "-p", json.dumps(patch))
    spec = json.loads(kubectl("get", "-n", namespace, "ibj", job, "-o", "json").stdout)["spec"]
    assert spec["suspend"] is True and spec["workers"]["maxReplicas"] == 8


def test_status_subresource_and_printer_columns(kubectl: Kubectl, namespace: str, job: str) -> None:
    status = {
        "observedGeneration": 1,
        "state": "Running",
        "reason": "Unschedulable",
        "ready": "0/2",
        "progress": "3/24",
        "activeReplicas": 2,
        "imagesPerSecond": "1.5",
        "eta": "1m0s",
        "conditions": [
            {
                "type": "Complete",
                "status": "False",
                "reason": "Running",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
        "manifest": None,
    }
    kubectl(
        "patch",
        "-n",
        namespace,
        "ibj",
        job,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    # The main resource ignores status.
    kubectl(
        "patch", "-n", namespace, "ibj", job, "--type=merge", "-p", json.dumps({"status": {"progress": "x"}})
    )
    got = json.loads(kubectl("get", "-n", namespace, "ibj", job, "-o", "json").stdout)["status"]
    assert got["progress"] == "3/24" and "manifest" not in got
    table = kubectl("get", "-n", namespace, "ibj", job).stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "REASON", "PROGRESS", "READY", "IMG/S", "ETA", "AGE"]
    assert table[1].split()[:7] == [job, "Running", "Unschedulable", "3/24", "0/2", "1.5", "1m0s"]
    bad = {"status": {"conditions": [{"type": "Complete", "status": "Maybe"}]}}
    proc = kubectl(
        "patch",
        "-n",
        namespace,
        "ibj",
        job,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(bad),
        check=False,
    )
    assert proc.returncode != 0 and "status.conditions[0].status" in proc.stderr


def shard(name: str, start: int, end: int) -> JSON:
    return {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatchShard",
        "metadata": {"name": name},
        "spec": {"jobName": "j", "index": 0, "start": start, "end": end},
    }


def test_shards(kubectl: Kubectl, namespace: str) -> None:
    proc = create(kubectl, namespace, shard("j-s0", 0, 4))
    assert proc.returncode == 0, proc.stderr
    proc = create(kubectl, namespace, shard("j-s1", 4, 4))
    assert proc.returncode != 0 and "spec.end must be greater than spec.start" in proc.stderr
    claim = {
        "status": {
            "state": "Claimed",
            "attempt": 1,
            "holder": "worker-0",
            "failures": 1,
            "leaseRenewTime": "2026-01-01T00:00:00Z",
        }
    }
    kubectl(
        "patch",
        "-n",
        namespace,
        "ibs",
        "j-s0",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(claim),
    )
    table = kubectl("get", "-n", namespace, "ibs", "j-s0").stdout.splitlines()
    assert table[0].split() == ["NAME", "JOB", "STATE", "ATTEMPT", "FAILURES", "HOLDER", "AGE"]
    assert table[1].split()[:6] == ["j-s0", "j", "Claimed", "1", "1", "worker-0"]
    proc = kubectl(
        "patch", "-n", namespace, "ibs", "j-s0", "--type=merge", "-p", '{"spec":{"end":9}}', check=False
    )
    assert proc.returncode != 0 and "spec of an ImageBatchShard is immutable" in proc.stderr
    bad = copy.deepcopy(claim)
    bad["status"]["state"] = "Lost"
    proc = kubectl(
        "patch",
        "-n",
        namespace,
        "ibs",
        "j-s0",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(bad),
        check=False,
    )
    assert proc.returncode != 0 and "status.state" in proc.stderr
    # The category lists both kinds.
    listed = kubectl("get", "-n", namespace, "imagebatch", "-o", "name").stdout
    assert "imagebatchshard.imagebatch.dev/j-s0" in listed and "imagebatchjob.imagebatch.dev/" in listed
