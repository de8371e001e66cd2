"""The operator's shard informer: what each watch event does to its view (operator/informer.py)."""

from __future__ import annotations

from typing import Any

import pytest

from imagebatch.names import LABEL_JOB_UID
from imagebatch.operator.informer import RelistError, ShardInformer, _Scope, apply_event, replace

JSON = dict[str, Any]


def shard(name: str, uid: str = "u1", rv: str = "1", ns: str = "ns", state: str = "Pending") -> JSON:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "resourceVersion": rv,
            "labels": {LABEL_JOB_UID: uid},
            "managedFields": [{"manager": "x"}],
        },
        "spec": {"index": 0},
        "status": {"state": state},
    }


# (case, events after a list of [a, b] of job u1 at version 10, the names of u1 after, last version)
CASES: list[tuple[str, list[JSON], set[str], str]] = [
    ("nothing", [], {"a", "b"}, "10"),
    ("added", [{"type": "ADDED", "object": shard("c", rv="11")}], {"a", "b", "c"}, "11"),
    ("deleted", [{"type": "DELETED", "object": shard("a", rv="12")}], {"b"}, "12"),
    (
        "modified keeps one entry",
        [{"type": "MODIFIED", "object": shard("a", rv="13", state="Claimed")}],
        {"a", "b"},
        "13",
    ),
    (
        "bookmark moves the version only",
        [{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}}],
        {"a", "b"},
        "20",
    ),
    (
        "another job's shard is not this job's",
        [{"type": "ADDED", "object": shard("x", uid="u2", rv="14")}],
        {"a", "b"},
        "14",
    ),
]


@pytest.mark.parametrize(("events", "names", "version"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_events(events: list[JSON], names: set[str], version: str) -> None:
    scope = _Scope("ns")
    replace(scope, [shard("a"), shard("b")], "10")
    for e in events:
        apply_event(scope, e)
    assert set(scope.by_uid.get("u1", {})) == names
    assert scope.resource_version == version
    assert all("managedFields" not in s["metadata"] for v in scope.by_uid.values() for s in v.values())


def test_a_modified_shard_is_seen_with_its_new_status() -> None:
    scope = _Scope("ns")
    replace(scope, [shard("a")], "10")
    apply_event(scope, {"type": "MODIFIED", "object": shard("a", rv="11", state="Done")})
    assert scope.by_uid["u1"]["a"]["status"]["state"] == "Done"


def test_an_error_event_asks_for_a_new_list() -> None:
    scope = _Scope("ns")
    replace(scope, [], "10")
    with pytest.raises(RelistError, match="too old"):
        apply_event(scope, {"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}})


def test_nothing_is_served_before_the_first_list() -> None:
    informer = ShardInformer.__new__(ShardInformer)
    informer.scopes = [_Scope("ns")]
    import threading

    informer._lock = threading.Lock()
    assert informer.shards("ns", "u1") is None  # the caller lists for itself
    replace(informer.scopes[0], [shard("a"), shard("b", uid="u2")], "5")
    got = informer.shards("ns", "u1")
    assert got is not None and [s["metadata"]["name"] for s in got] == ["a"]
    assert informer.shards("other-ns", "u1") is None  # a namespace it does not watch
