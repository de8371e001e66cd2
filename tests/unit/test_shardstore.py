"""The shared shard store and plan check (imagebatch/shardstore.py, imagebatch/shardplan.py), as
the two sides use them: the operator's view goes unsynced when its watch breaks, the worker's
is served on and resumes; the operator hears of state changes only."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3

from imagebatch.names import ANNOTATION_SHARD_COUNT, LABEL_JOB_UID
from imagebatch.operator.informer import ShardInformer, _Scope
from imagebatch.shardplan import plan_complete
from imagebatch.shardstore import ShardStore

JSON = dict[str, Any]


def shard(name: str, rv: int, state: str = "Pending", count: str | None = "2") -> JSON:
    meta: JSON = {"name": name, "namespace": "ns", "resourceVersion": str(rv), "labels": {LABEL_JOB_UID: "u"}}
    if count is not None:
        meta["annotations"] = {ANNOTATION_SHARD_COUNT: count}
    return {"metadata": meta, "spec": {"index": 0}, "status": {"state": state}}


@pytest.mark.parametrize(
    ("shards", "complete"),
    [
        ([], False),
        ([shard("a", 1), shard("b", 2)], True),
        ([shard("a", 1)], False),  # one of two: the planner is still creating
        ([shard("a", 1), shard("b", 2, count=None)], False),  # one not made by the plan
        ([shard("a", 1, count="3"), shard("b", 2, count="3")], False),
    ],
)
def test_plan_complete(shards: list[JSON], complete: bool) -> None:
    assert plan_complete(shards) is complete


class Script:
    """A lister and a watcher answering as scripted; once the script is out, the watch blocks."""

    def __init__(self, lists: list[tuple[list[JSON], str]], watches: list[list[Any]]) -> None:
        self.lists, self.watches = lists, watches
        self.listed = 0
        self.watched_from: list[str] = []
        self.idle = threading.Event()

    def list(self, until: threading.Event) -> tuple[list[JSON], str]:
        self.listed += 1
        return self.lists.pop(0)

    def watch(self, since: str, until: threading.Event) -> Iterator[JSON]:
        self.watched_from.append(since)
        if not self.watches:
            self.idle.set()
            until.wait(120)
            return
        for item in self.watches.pop(0):
            if isinstance(item, BaseException):
                raise item
            yield item


def scope_with(script: Script) -> _Scope:
    scope = _Scope("ns")
    scope.lister, scope.watcher = script.list, script.watch
    scope.wait_strategy = lambda state: 0.0  # no backoff in a test
    return scope


DROPPED = urllib3.exceptions.ProtocolError("Connection broken")


def test_the_operator_relists_after_a_broken_watch_and_serves_nothing_until_then() -> None:
    served: list[object] = []
    script = Script(
        lists=[([shard("a", 1)], "5"), ([shard("a", 7, "Done")], "8")],
        watches=[[{"type": "MODIFIED", "object": shard("a", 6, "Claimed")}, DROPPED]],
    )
    scope = scope_with(script)
    real_list = script.list

    def list_and_look(until: threading.Event) -> tuple[list[JSON], str]:
        if script.listed:  # the relist: what a pass got meanwhile
            served.append(informer.shards("ns", "u"))
        return real_list(until)

    scope.lister = list_and_look
    informer = ShardInformer.__new__(ShardInformer)
    informer.scopes = [scope]
    scope.start()
    try:
        assert script.idle.wait(120)
        assert served == [None], "a broken watch may have missed changes: passes list for themselves"
        assert script.listed == 2 and script.watched_from == ["5", "8"]
        got = informer.shards("ns", "u")
        assert got is not None and got[0]["status"]["state"] == "Done"
    finally:
        scope.close()


def test_the_worker_serves_its_view_through_a_dropped_connection_and_resumes() -> None:
    class View(ShardStore):
        def __init__(self, script: Script) -> None:
            super().__init__(script.list, script.watch, wait=lambda state: 0.0)
            self.names: set[str] = set()
            self.synced_at_resume: list[bool] = []

        def _clear(self) -> None:
            self.names = set()

        def _put(self, obj: JSON) -> bool:
            self.names.add(obj["metadata"]["name"])
            return True

        def _drop(self, obj: JSON) -> bool:
            self.names.discard(obj["metadata"]["name"])
            return True

    script = Script(
        lists=[([shard("a", 1)], "5")], watches=[[{"type": "ADDED", "object": shard("b", 6)}, DROPPED]]
    )
    view = View(script)
    real_watch = script.watch

    def watch_and_look(since: str, until: threading.Event) -> Iterator[JSON]:
        view.synced_at_resume.append(view.synced)
        return real_watch(since, until)

    view.watcher = watch_and_look
    view.start()
    try:
        assert script.idle.wait(120)
        assert script.listed == 1 and script.watched_from == ["5", "6"], "resumed where it was"
        assert view.synced_at_resume == [True, True] and view.names == {"a", "b"}
    finally:
        view.close()


def test_the_operator_hears_of_state_changes_only() -> None:
    script = Script(
        lists=[([shard("a", 1)], "5")],
        watches=[
            [
                {"type": "MODIFIED", "object": shard("a", 6)},  # a renewal: still Pending
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "7"}}},
                {"type": "MODIFIED", "object": shard("a", 8, "Claimed")},
                {"type": "DELETED", "object": shard("zz", 9)},  # never seen: nothing changed
                {"type": "DELETED", "object": shard("a", 10)},
            ]
        ],
    )
    scope = scope_with(script)
    informer = ShardInformer.__new__(ShardInformer)
    informer.scopes, informer.on_change = [scope], None
    poked: list[str] = []
    informer.on_change = poked.append
    scope.on_change = informer._changed
    scope.start()
    try:
        assert script.idle.wait(120)
        assert poked == ["u", "u"]
        assert script.watched_from == ["5", "10"]
    finally:
        scope.close()
