"""Issues 9 (4) and 14 (4): a job that cannot work ends Failed with a message that names the cause
and what to change, readable in `kubectl get ibj -o yaml` without any pod's log; and it fails once,
not in a loop of re-created worker Jobs.

The worker writes its fatal error to its container's termination message (worker/termination.py);
the node agent reports it in the pod's `state.terminated.message`, as the kubelet does; the
operator copies it into the Failed condition. Wrong S3 credentials are refused by a real S3 API
(moto's server, here checking every signature)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import Kubectl, Operator, tiny_job, wait_condition, wait_for

from imagebatch_testing.s3 import S3Server, s3_server

pytestmark = pytest.mark.cluster

BUCKET = "team-images"


@pytest.fixture(scope="module")
def checking_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, dict[str, str]]]:
    """An S3 server of this module's own that refuses unknown keys (the session's takes any);
    its bucket holds a prompt file."""
    with s3_server(str(tmp_path_factory.mktemp("s3auth") / "moto.log")) as server:
        server.create_bucket(BUCKET)
        good = server.enforce_auth()
        import boto3

        boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            aws_access_key_id=good["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=good["AWS_SECRET_ACCESS_KEY"],
            region_name=good["AWS_DEFAULT_REGION"],
        ).put_object(Bucket=BUCKET, Key="prompts/p.txt", Body=b"a cat\na dog\n")
        yield server, good


def failed_condition_in_yaml(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    """The Failed condition as a user reads it: `kubectl get ibj NAME -o yaml`."""
    doc = yaml.safe_load(kubectl("get", "ibj", name, "-n", namespace, "-o", "yaml").stdout)
    found = next((c for c in doc["status"].get("conditions") or [] if c["type"] == "Failed"), None)
    assert found is not None and found["status"] == "True", doc["status"]
    return dict(found)


def termination_messages(kubectl: Kubectl, namespace: str) -> list[str]:
    """What the failed worker pods said as they ended (what the operator reads and copies),
    once none runs. A pod the operator stopped (the job failed by a shard's error first) may be
    gone by then; the pod that failed planning is never stopped by anyone but itself."""
    wait_for(
        "no running workers",
        lambda: all(
            p["status"].get("phase") in ("Succeeded", "Failed")
            for p in kubectl.json("get", "pods", "-n", namespace)["items"]
        ),
        timeout=300,
    )
    return [
        cs["state"]["terminated"].get("message", "")
        for p in kubectl.json("get", "pods", "-n", namespace)["items"]
        for cs in p["status"].get("containerStatuses") or []
        if "terminated" in cs.get("state", {}) and cs["state"]["terminated"].get("exitCode") != 0
    ]


def worker_job_incarnations(kubectl: Kubectl, namespace: str, name: str) -> set[str]:
    """The UIDs of every worker Job of the job that made pods, from the job controller's Events
    (which outlive a deleted Job): more than one means the Job was re-created."""
    events = kubectl.json("get", "events", "-n", namespace)["items"]
    return {
        e["involvedObject"]["uid"]
        for e in events
        if e["involvedObject"].get("kind") == "Job" and e["involvedObject"].get("name") == f"{name}-workers"
    }


def assert_fails_once(kubectl: Kubectl, operator: Operator, namespace: str, name: str) -> None:
    """No re-created worker Job and no more pods, over operator passes after the failure (the
    pods have ended: termination_messages waited for that)."""
    pods = {p["metadata"]["name"] for p in kubectl.json("get", "pods", "-n", namespace)["items"]}
    operator.wait_passes(namespace, name, n=3)
    assert len(worker_job_incarnations(kubectl, namespace, name)) == 1  # one worker Job, never re-created
    assert {p["metadata"]["name"] for p in kubectl.json("get", "pods", "-n", namespace)["items"]} <= pods
    assert len(pods) <= 2, pods  # maxReplicas; a user error fails the Job at its first pod's exit


@pytest.mark.parametrize("prompts_on_s3", [False, True], ids=["output", "prompt-file"])
def test_wrong_s3_credentials_fail_the_job_naming_the_bucket(
    kubectl: Kubectl,
    running_operator: Operator,
    namespace: str,
    checking_s3: tuple[S3Server, dict[str, str]],
    prompts_on_s3: bool,
) -> None:
    server, good = checking_s3
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-creds"},
        "type": "Opaque",
        # A key the store does not know (a typo, a rotated key): the store answers 403.
        "stringData": {**good, "AWS_ACCESS_KEY_ID": "AKIAWRONGKEY0000"},
    }
    name = "bad-creds"
    source: dict[str, Any] = (
        {"promptsFrom": {"uri": f"s3://{BUCKET}/prompts/p.txt"}}
        if prompts_on_s3
        else {"prompts": [f"prompt {i}" for i in range(40)], "batching": {"shardSize": 10}}
    )
    job = tiny_job(
        name,
        f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}",
        output={"endpointUrl": server.endpoint, "credentialsSecret": {"name": "s3-creds"}},
        **source,
    )
    kubectl.apply([secret, job], namespace)
    wait_condition(kubectl, namespace, name, "Failed", timeout=300)
    said = termination_messages(kubectl, namespace)
    assert all(f"the credentials were refused for bucket {BUCKET!r}" in m for m in said), said
    assert said or not prompts_on_s3, "the pod that failed planning reported nothing"
    failed = failed_condition_in_yaml(kubectl, namespace, name)
    assert "the credentials were refused" in failed["message"], failed
    assert f"bucket {BUCKET!r}" in failed["message"] and "Secret 's3-creds'" in failed["message"], failed
    assert_fails_once(kubectl, running_operator, namespace, name)


BAD_PROMPTS = [
    (
        "p.jsonl",
        '{"prompt": "a cat"}\n{"prompt": "a dog"}\n{"prompt": a bird}\n',
        ["p.jsonl line 3: malformed JSON", "fix line 3"],
    ),
    (
        "p.csv",
        "caption,seed\na cat,1\n",
        ["p.csv line 1 (the header): the csv has no 'prompt' column", "set spec.promptsFrom.column"],
    ),
    ("p.txt", "\n\n", ["p.txt: the prompt file holds no prompts", "add at least one"]),
]


@pytest.mark.parametrize(
    ("file", "text", "says"), BAD_PROMPTS, ids=["malformed-jsonl", "csv-no-column", "empty"]
)
def test_a_bad_prompt_file_fails_with_the_file_the_line_and_what_to_change(
    kubectl: Kubectl,
    running_operator: Operator,
    namespace: str,
    tmp_path: Path,
    file: str,
    text: str,
    says: list[str],
) -> None:
    prompt_file = tmp_path / file
    prompt_file.write_text(text)
    name = "bad-prompts"
    kubectl.apply([tiny_job(name, str(tmp_path / "out"), promptsFrom={"uri": str(prompt_file)})], namespace)
    wait_condition(kubectl, namespace, name, "Failed", timeout=300)
    said = termination_messages(kubectl, namespace)
    assert said and all(m.startswith(f"spec.promptsFrom.uri: {prompt_file}") for m in said), said
    failed = failed_condition_in_yaml(kubectl, namespace, name)
    assert f"spec.promptsFrom.uri: {tmp_path}/" in failed["message"], failed
    for part in says:
        assert part in failed["message"], failed
    assert_fails_once(kubectl, running_operator, namespace, name)


def test_an_unwritable_output_location_fails_naming_spec_output_uri(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    # A folder under a plain file cannot be made by anyone, root included (ENOTDIR). (Not /sys:
    # the worker's access rules refuse it before any write, imagebatch/access.py.)
    (tmp_path / "a-file").write_text("")
    out = str(tmp_path / "a-file" / f"imagebatch-{uuid.uuid4().hex[:8]}")
    name = "bad-output"
    job = tiny_job(name, out, prompts=[f"prompt {i}" for i in range(20)], batching={"shardSize": 10})
    kubectl.apply([job], namespace)
    wait_condition(kubectl, namespace, name, "Failed", timeout=300)
    said = termination_messages(kubectl, namespace)
    assert all(m.startswith(f"spec.output.uri: cannot write to '{out}'") for m in said), said
    failed = failed_condition_in_yaml(kubectl, namespace, name)
    assert f"spec.output.uri: cannot write to '{out}'" in failed["message"], failed
    assert "set spec.output.uri to a location they can write" in failed["message"], failed
    assert_fails_once(kubectl, running_operator, namespace, name)


def test_an_unexpected_worker_error_is_its_pods_termination_message(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    """Not a user error (a worker bug, a broken image): the pod ends with exit 1 and says
    `<Type>: <message>`, what the operator shows once the Job's retries of it run out (a
    misspelt failpoint is a ValueError the worker does not expect, from a real pod)."""
    name = "crashing"
    env = [{"name": "IMAGEBATCH_FAILPOINTS", "value": "no-such-point=hold"}]
    job = tiny_job(name, str(tmp_path / "out"), prompts=["a cat"], workers={"maxReplicas": 1, "env": env})
    kubectl.apply([job], namespace)

    def crashed() -> list[dict[str, Any]]:
        return [
            cs["state"]["terminated"]
            for p in kubectl.json("get", "pods", "-n", namespace)["items"]
            for cs in p["status"].get("containerStatuses") or []
            if cs.get("state", {}).get("terminated", {}).get("exitCode") == 1
        ]

    ended = wait_for("a worker pod that crashed", crashed, timeout=300)
    assert ended[0]["message"].startswith(
        "ValueError: IMAGEBATCH_FAILPOINTS: cannot read 'no-such-point=hold'"
    )
    assert "\n" not in ended[0]["message"].strip() and "Traceback" not in ended[0]["message"]
