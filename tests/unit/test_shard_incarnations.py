"""Shards are bound to their job's UID: a job deleted and re-created under the same name never
counts, claims, plans over or adopts the shards of the old incarnation (which the garbage
collector may still be deleting)."""

from __future__ import annotations

import copy
import json
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from test_reconcile import FakeKube, cond, job, passes
from test_worker_claims import FakeShardApi

from imagebatch.errors import ImageBatchError
from imagebatch.names import ANNOTATION_MANIFEST_LINES, LABEL_JOB, LABEL_JOB_UID, shard_name
from imagebatch.operator.kube import NotOwnedError, OperatorKube
from imagebatch.shardplan import of_incarnation, shard_manifests, shard_selector
from imagebatch.worker.cluster import EarlierIncarnationError, Worker
from imagebatch.worker.kube import WorkerKube

JSON = dict[str, Any]
OLD, NEW = "0ld0ld00-1111-4111-8111-111111111111", "9e9e9e9e-2222-4222-8222-222222222222"


def incarnation(uid: str, **meta: Any) -> JSON:
    body = job()
    body["metadata"] = {**body["metadata"], "uid": uid, **meta}
    return body


def a_shard(uid: str | None, owner_uid: str | None, kind: str = "ImageBatchJob", **meta: Any) -> JSON:
    labels = {LABEL_JOB: "j"} | ({LABEL_JOB_UID: uid} if uid is not None else {})
    owners = [{"kind": kind, "name": "j", "uid": owner_uid}] if owner_uid is not None else []
    name = shard_name("j", uid or NEW, 0)
    return {"metadata": {"name": name, "labels": labels, "ownerReferences": owners, **meta}}


@pytest.mark.parametrize(
    ("shard", "ours"),
    [
        (a_shard(NEW, NEW), True),
        (a_shard(NEW, NEW, deletionTimestamp="2026-01-01T00:00:00Z"), True),  # ours, being deleted
        (a_shard(OLD, OLD), False),  # the old incarnation's
        (a_shard(OLD, OLD, deletionTimestamp="2026-01-01T00:00:00Z"), False),  # ... being collected
        (a_shard(NEW, OLD), False),  # our label, someone else's owner: not adopted
        (a_shard(None, NEW), False),  # owned, but no UID label (made by hand)
        (a_shard(NEW, None), False),  # labelled, owned by nobody
        (a_shard(NEW, NEW, kind="Deployment"), False),  # the UID of an object of another kind
        ({"metadata": {"name": "bare"}}, False),
        # Forged by another job's worker token: it agrees in some names only.
        (a_shard(NEW, NEW, ownerReferences=[{"kind": "ImageBatchJob", "name": "j", "uid": NEW}] * 2), False),
        (a_shard(NEW, NEW, ownerReferences=[{"kind": "ImageBatchJob", "name": "fa", "uid": NEW}]), False),
        (a_shard(NEW, NEW, name=shard_name("fa", NEW, 0)), False),  # another job's name prefix
        (a_shard(NEW, NEW, name=shard_name("j", OLD, 0)), False),  # another incarnation's prefix
    ],
)
def test_which_shards_are_this_incarnations(shard: JSON, ours: bool) -> None:
    assert of_incarnation(shard, NEW) is ours


def test_names_and_labels_keep_incarnations_apart() -> None:
    old = shard_manifests(incarnation(OLD), 10, 4)
    new = shard_manifests(incarnation(NEW), 10, 4)
    assert [s["metadata"]["name"] for s in old] == [
        "j-0ld0ld00-s00000",
        "j-0ld0ld00-s00001",
        "j-0ld0ld00-s00002",
    ]
    assert not {s["metadata"]["name"] for s in old} & {s["metadata"]["name"] for s in new}
    # Deterministic within one incarnation: planners racing each other create each shard once.
    assert new == shard_manifests(incarnation(NEW), 10, 4)
    assert all(of_incarnation(s, NEW) and not of_incarnation(s, OLD) for s in new)
    assert shard_name("j", NEW, 7) == "j-9e9e9e9e-s00007"
    assert shard_selector("j", NEW) == f"{LABEL_JOB}=j,{LABEL_JOB_UID}={NEW}"


# -- the operator's pass with the old incarnation's shards still there -------------------------------


def old_shards(kube: FakeKube, state: str, collected: bool = True) -> dict[str, JSON]:
    """The old incarnation planned and got to `state`, then was deleted; its shards remain, and
    its worker Job and RBAC too unless the garbage collector got to them (`collected`)."""
    passes(kube, incarnation(OLD))
    for s in kube.shards.values():
        s["status"] = {"state": state, "attempt": 3, "holder": "old-pod", "error": "old error"}
        if state == "Claimed":
            s["status"]["leaseRenewTime"] = "2020-01-01T00:00:00Z"  # long expired
    first = next(s for s in kube.shards.values() if s["spec"]["index"] == 0)
    first["metadata"]["annotations"][ANNOTATION_MANIFEST_LINES] = "10"
    kube.status, kube.events = None, []
    if collected:
        kube.job, kube.objects = None, {}
    return copy.deepcopy(kube.shards)


def test_a_recreated_job_waits_for_the_old_worker_job_and_rbac_to_be_collected() -> None:
    kube = FakeKube()
    old_shards(kube, "Done", collected=False)
    old_job = copy.deepcopy(kube.job)
    status = passes(kube, incarnation(NEW))
    waiting = cond(status, "Reconciling")
    assert waiting["reason"] == "WaitingForEarlierIncarnation" and "garbage collector" in waiting["message"]
    assert cond(status, "Failed")["status"] == "False"
    assert kube.job == old_job  # neither adopted (scaled) nor replaced
    assert status["shards"]["total"] == 5 and status["shards"]["done"] == 0
    kube.job = None  # the garbage collector deleted the old worker Job; its RBAC is still there
    status = passes(kube, {**incarnation(NEW), "status": kube.status})
    assert cond(status, "Reconciling")["reason"] == "WaitingForEarlierIncarnation" and kube.job is None
    kube.objects = {}  # ... and now that too
    status = passes(kube, {**incarnation(NEW), "status": kube.status})
    assert cond(status, "Reconciling")["reason"] == "Running"
    assert kube.job is not None and kube.job["metadata"]["ownerReferences"][0]["uid"] == NEW


@pytest.mark.parametrize("state", ["Done", "Failed", "Claimed", "Pending"])
def test_a_recreated_job_plans_its_own_shards_and_counts_only_them(state: str) -> None:
    kube = FakeKube()
    before = old_shards(kube, state)
    status = passes(kube, incarnation(NEW))
    new = {n: s for n, s in kube.shards.items() if n not in before}
    assert len(new) == 5 and all(of_incarnation(s, NEW) for s in new.values())
    assert {n: kube.shards[n] for n in before} == before  # untouched: no requeue, no adoption
    assert status["shards"] == {"total": 5, "pending": 5, "claimed": 0, "done": 0, "failed": 0}
    assert status["items"]["total"] == 10 and status["items"]["done"] == 0
    assert cond(status, "Complete")["status"] == "False" and cond(status, "Failed")["status"] == "False"
    assert ("CreatedShards", "planned 10 images in 5 shards") in kube.events


def test_a_taken_shard_name_fails_the_job_instead_of_adopting_the_shard() -> None:
    kube = FakeKube()
    squatter = shard_manifests(incarnation(NEW), 10, 2)[3]
    squatter["metadata"]["labels"][LABEL_JOB_UID] = OLD
    squatter["metadata"]["ownerReferences"][0]["uid"] = OLD
    kube.shards[squatter["metadata"]["name"]] = squatter
    status = passes(kube, incarnation(NEW))
    failed = cond(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "ShardNotOwned"
    assert squatter["metadata"]["name"] in failed["message"] and "does not adopt" in failed["message"]


# -- the two API modules: what they select and what a 409 means ---------------------------------------


class FakeCustomObjects:
    """The custom-objects API: every shard of the namespace, whatever the selector (the modules
    must filter too), and a 409 for a name that is taken."""

    def __init__(self, shards: list[JSON], vanish: bool = False) -> None:
        self.shards = {s["metadata"]["name"]: s for s in shards}
        self.selectors: list[str] = []
        self.vanish = vanish  # the taken name is deleted between the 409 and the read
        self.created: list[str] = []

    def list_namespaced_custom_object(self, *args: Any, label_selector: str, **kw: Any) -> Any:
        self.selectors.append(label_selector)
        return SimpleNamespace(
            data=json.dumps({"metadata": {"resourceVersion": "7"}, "items": list(self.shards.values())})
        )

    def create_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, obj: JSON, **kw: Any
    ) -> None:
        name = obj["metadata"]["name"]
        if name in self.shards:
            if self.vanish:
                del self.shards[name]
            raise ApiException(status=409, reason="AlreadyExists")
        self.shards[name] = obj
        self.created.append(name)

    def get_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, name: str, **kw: Any
    ) -> Any:
        if name not in self.shards:
            raise ApiException(status=404, reason="NotFound")
        return SimpleNamespace(data=json.dumps(self.shards[name]))


def both_incarnations() -> tuple[list[JSON], list[JSON]]:
    old = shard_manifests({**incarnation(OLD), "metadata": {**incarnation(OLD)["metadata"]}}, 10, 5)
    new = shard_manifests(incarnation(NEW), 10, 5)
    return old, new


def worker_kube(api: FakeCustomObjects) -> WorkerKube:
    kube = WorkerKube.__new__(WorkerKube)
    kube.ns, kube.job, kube.custom = "ns", "j", api  # type: ignore[assignment]
    return kube


def operator_kube(api: FakeCustomObjects) -> OperatorKube:
    kube = OperatorKube.__new__(OperatorKube)
    kube.custom = api  # type: ignore[assignment]
    kube.shard_informer = None
    kube._forged, kube._forged_lock = {}, threading.Lock()
    return kube


def test_both_sides_list_only_their_incarnations_shards() -> None:
    old, new = both_incarnations()
    api = FakeCustomObjects(old + new)
    names = sorted(s["metadata"]["name"] for s in new)
    assert sorted(s["metadata"]["name"] for s in worker_kube(api).list_shards(NEW)) == names
    assert sorted(s["metadata"]["name"] for s in operator_kube(api).list_shards("ns", "j", NEW)) == names
    assert api.selectors == [shard_selector("j", NEW)] * 2


@pytest.mark.parametrize(
    ("existing", "vanish", "outcome"),
    [
        ("ours", False, False),  # another planner made it first: fine, not created here
        ("theirs", False, "refused"),  # the name is taken by another incarnation's shard
        ("theirs", True, True),  # ... which was deleted in between: created here after all
        ("none", False, True),
    ],
)
@pytest.mark.parametrize("side", ["worker", "operator"])
def test_a_409_on_create_is_ours_or_refused(side: str, existing: str, vanish: bool, outcome: object) -> None:
    _, new = both_incarnations()
    obj = new[0]
    taken = copy.deepcopy(obj)
    if existing == "theirs":
        taken["metadata"]["labels"][LABEL_JOB_UID] = OLD
        taken["metadata"]["ownerReferences"][0]["uid"] = OLD
    api = FakeCustomObjects([] if existing == "none" else [taken], vanish=vanish)
    create = worker_kube(api).create_shard if side == "worker" else operator_kube(api).create_shard
    if outcome == "refused":
        error = ImageBatchError if side == "worker" else NotOwnedError
        with pytest.raises(error, match=obj["metadata"]["name"]):
            create(copy.deepcopy(obj))
        assert api.created == []
    else:
        assert create(copy.deepcopy(obj)) is outcome
        assert api.created == ([obj["metadata"]["name"]] if outcome else [])


@pytest.mark.parametrize(("expected", "works"), [(None, True), ("u", True), ("an-earlier-uid", False)])
def test_a_pod_of_an_earlier_incarnation_does_not_work_for_the_new_one(
    expected: str | None, works: bool
) -> None:
    """The job read by name is the re-created one (uid "u"); a pod made for the earlier one stops."""
    api = FakeShardApi(2)
    if works:
        assert Worker(api, "pod", threading.Event(), expected_uid=expected).uid == "u"  # type: ignore[arg-type]
    else:
        with pytest.raises(EarlierIncarnationError, match="re-created"):
            Worker(api, "pod", threading.Event(), expected_uid=expected)  # type: ignore[arg-type]


def test_a_plan_of_too_many_shards_is_refused_naming_shard_size() -> None:
    from imagebatch.api import MAX_SHARDS_PER_JOB
    from imagebatch.errors import ImageBatchError
    from imagebatch.shardplan import check_shard_count

    check_shard_count(MAX_SHARDS_PER_JOB * 256, 256)  # at the cap: fine
    with pytest.raises(ImageBatchError) as e:
        check_shard_count(1_000_000, 1)
    assert "spec.batching.shardSize" in str(e.value) and "set spec.batching.shardSize to 50 or more" in str(
        e.value
    )


def test_inline_prompts_of_too_many_shards_are_an_invalid_spec() -> None:
    from pydantic import ValidationError

    from imagebatch.api import ImageBatchJobSpec

    spec = {
        "model": {"name": "builtin:tiny"},
        "prompts": [f"p{i}" for i in range(400)],
        "generation": {"imagesPerPrompt": 64},
        "batching": {"shardSize": 1},
        "output": {"uri": "/out"},
    }
    with pytest.raises(ValidationError) as e:
        ImageBatchJobSpec.model_validate(spec)
    assert "25600 ImageBatchShards" in str(e.value) and "spec.batching.shardSize to 2 or more" in str(e.value)
    spec["batching"] = {"shardSize": 2}
    ImageBatchJobSpec.model_validate(spec)
