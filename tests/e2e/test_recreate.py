"""A job deleted and re-created under the same name while its old shards still exist (the garbage
collector deletes them in the background; thousands take a while) completes with its own images
only: it never counts, claims, plans over or adopts a shard of the old incarnation.

The old shards are held by a finalizer this test puts on them, so they demonstrably exist, marked
for deletion by the garbage collector, for as long as the new job runs: no race with the collector,
no sleeps. Both planners are covered: the operator (inline prompts) and the first worker (a
prompt file)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Kubectl, Operator, check_output_dir, ibj, tiny_job, wait_condition, wait_for

pytestmark = pytest.mark.cluster

HOLD = "e2e.imagebatch.dev/hold"
JSON = dict[str, Any]


def shards_named(kubectl: Kubectl, namespace: str, job: str) -> list[JSON]:
    """Every shard labelled with the job's name, of any incarnation."""
    items: list[JSON] = kubectl.json("get", "ibs", "-n", namespace, "-l", f"imagebatch.dev/job={job}")[
        "items"
    ]
    return items


def set_finalizers(kubectl: Kubectl, namespace: str, shard: str, finalizers: list[str]) -> None:
    patch = json.dumps({"metadata": {"finalizers": finalizers}})
    kubectl("patch", "ibs", shard, "-n", namespace, "--type=merge", "-p", patch, check=False)


@pytest.fixture
def held(kubectl: Kubectl, namespace: str) -> Iterator[list[str]]:
    """Names of shards held by the test's finalizer; released at the end, pass or fail."""
    names: list[str] = []
    yield names
    for name in names:
        set_finalizers(kubectl, namespace, name, [])


@pytest.mark.parametrize("planner", ["operator", "worker"])
def test_a_recreated_job_makes_only_its_own_images(
    kubectl: Kubectl,
    running_operator: Operator,
    namespace: str,
    tmp_path: Path,
    held: list[str],
    planner: str,
) -> None:
    name = "again"
    # The first incarnation: 8 images in 2 shards, Complete (its shard 0 records the joined
    # manifest: the state that, adopted, would mark the new job Complete with nothing made).
    first = tiny_job(
        name,
        str(tmp_path / "out1"),
        prompts=[f"a red cube, number {i}" for i in range(8)],
        batching={"batchSize": 4, "shardSize": 4},
    )
    kubectl.apply([first], namespace)
    wait_condition(kubectl, namespace, name, "Complete", timeout=600)
    old_uid = ibj(kubectl, namespace, name)["metadata"]["uid"]
    old = shards_named(kubectl, namespace, name)
    assert len(old) == 2 and {s["status"]["state"] for s in old} == {"Done"}
    for s in old:
        held.append(s["metadata"]["name"])
        set_finalizers(kubectl, namespace, s["metadata"]["name"], [HOLD])

    # Deleted as kubectl does by default (background propagation): the job goes at once, its
    # shards when the garbage collector gets to them, and these not before the test lets them.
    kubectl("delete", "ibj", name, "-n", namespace, "--wait=false")
    wait_for(
        "the old job gone and its shards marked for deletion",
        lambda: (
            kubectl("get", "ibj", name, "-n", namespace, check=False).returncode != 0
            and all(s["metadata"].get("deletionTimestamp") for s in shards_named(kubectl, namespace, name))
        ),
        timeout=300,
    )
    before = {s["metadata"]["name"]: s for s in shards_named(kubectl, namespace, name)}
    assert set(before) == set(held)

    # The second incarnation: other prompts, another count, another output folder.
    prompts = [f"a blue sphere, number {i}" for i in range(12)]
    source: JSON
    if planner == "operator":
        source = {"prompts": prompts}
    else:
        prompt_file = tmp_path / "prompts.txt"
        prompt_file.write_text("".join(f"{p}\n" for p in prompts))
        source = {"promptsFrom": {"uri": str(prompt_file)}}
    out2 = tmp_path / "out2"
    second = tiny_job(name, str(out2), batching={"batchSize": 4, "shardSize": 5}, **source)
    kubectl.apply([second], namespace)
    wait_condition(kubectl, namespace, name, "Complete", timeout=600)

    job = ibj(kubectl, namespace, name)
    new_uid = job["metadata"]["uid"]
    assert new_uid != old_uid
    # Its status counts its own shards and items only.
    assert job["status"]["items"] == {"total": 12, "done": 12, "failed": 0}
    assert job["status"]["shards"]["total"] == job["status"]["shards"]["done"] == 3
    # Exactly its own images, in its own folder.
    lines = check_output_dir(out2, 12)
    assert sorted(line["prompt"] for line in lines) == sorted(prompts)
    # Its own shards: labelled and owned by the new UID, named apart from the old ones.
    shards = {s["metadata"]["name"]: s for s in shards_named(kubectl, namespace, name)}
    new = {n: s for n, s in shards.items() if n not in before}
    assert len(new) == 3
    for s in new.values():
        assert s["metadata"]["labels"]["imagebatch.dev/job-uid"] == new_uid
        assert [r["uid"] for r in s["metadata"]["ownerReferences"]] == [new_uid]
        assert s["status"]["state"] == "Done"
    # The old shards are still there and untouched: not claimed, requeued or annotated.
    for n, s in before.items():
        assert shards[n]["metadata"]["resourceVersion"] == s["metadata"]["resourceVersion"], n
        assert shards[n]["metadata"]["labels"]["imagebatch.dev/job-uid"] == old_uid
