"""The worker's watch-fed shard cache: what each watch event does to it, and whom it wakes.

No cluster: events are fed by hand (the table) or by a scripted source (the watch thread)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from imagebatch.errors import ImageBatchError
from imagebatch.names import LABEL_JOB, LABEL_JOB_UID, shard_name
from imagebatch.worker.shardcache import RelistError, ShardCache

JSON = dict[str, Any]
UID = "u-1"


def shard(i: int, rv: int, state: str = "Pending", holder: str | None = None, uid: str = UID) -> JSON:
    status: JSON = {"state": state, "attempt": 1 if holder else 0}
    if holder:
        status["holder"] = holder
    return {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatchShard",
        "metadata": {
            "name": shard_name("j", uid, i),
            "namespace": "ns",
            "resourceVersion": str(rv),
            "labels": {LABEL_JOB: "j", LABEL_JOB_UID: uid},
            "ownerReferences": [{"kind": "ImageBatchJob", "name": "j", "uid": uid}],
        },
        "spec": {"jobName": "j", "index": i, "start": i * 10, "end": i * 10 + 10},
        "status": status,
    }


def ev(kind: str, obj: JSON) -> JSON:
    return {"type": kind, "object": obj}


def bookmark(rv: int) -> JSON:
    return ev("BOOKMARK", {"kind": "ImageBatchShard", "metadata": {"resourceVersion": str(rv)}})


GONE = ev(
    "ERROR", {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}
)


def names(shards: list[JSON]) -> list[int]:
    return [int(s["spec"]["index"]) for s in shards]


# (event, pending indexes after it, claimed by someone other than pod-a, woken, resume version)
TABLE: list[tuple[str, JSON, list[int], bool, str | None]] = [
    ("a new shard", ev("ADDED", shard(2, 11)), [0, 1, 2], True, "11"),
    ("pod-b claims 0", ev("MODIFIED", shard(0, 12, "Claimed", "pod-b")), [1, 2], True, "12"),
    ("pod-a claims 1", ev("MODIFIED", shard(1, 13, "Claimed", "pod-a")), [2], True, "13"),
    ("an older copy of 0, after a newer one", ev("MODIFIED", shard(0, 9)), [2], False, "9"),
    ("a bookmark", bookmark(20), [2], False, "20"),
    ("another incarnation's shard", ev("ADDED", shard(7, 21, uid="u-0")), [2], False, "21"),
    ("0 done", ev("MODIFIED", shard(0, 22, "Done", "pod-b")), [2], True, "22"),
    ("2 deleted", ev("DELETED", shard(2, 23)), [], True, "23"),
    ("an unknown shard deleted", ev("DELETED", shard(9, 24)), [], False, "24"),
    ("1 requeued (pod-a's lease expired)", ev("MODIFIED", shard(1, 25)), [1], True, "25"),
]


def test_each_watch_event_changes_the_cache_and_wakes_waiters_only_when_it_changed() -> None:
    cache = ShardCache(None, UID)  # type: ignore[arg-type]  # no source: events are fed here
    cache.replace([shard(0, 5), shard(1, 6)], "10")
    assert names(cache.pending()) == [0, 1] and cache.synced and cache.resource_version == "10"
    for what, event, pending, woken, rv in TABLE:
        before = cache.version
        cache.apply(event)
        assert names(cache.pending()) == pending, what
        assert (cache.version > before) is woken, what
        assert cache.resource_version == rv, what
    before = cache.version
    with pytest.raises(RelistError, match="410"):
        cache.apply(GONE)
    assert cache.resource_version is None, "after 410 Gone the watch cannot resume: relist"
    assert cache.version == before
    cache.replace([shard(3, 30)], "31")  # the relist replaces everything
    assert names(cache.pending()) == [3]
    assert [s["metadata"]["name"] for s in cache.shards()] == [shard_name("j", UID, 3)]


def test_a_write_answer_is_seen_at_once_and_not_undone_by_an_older_event() -> None:
    cache = ShardCache(None, UID)  # type: ignore[arg-type]
    cache.replace([shard(0, 5)], "5")
    cache.observe(shard(0, 8, "Claimed", "pod-a"))  # our claim, as the API answered it
    assert cache.pending() == []
    cache.apply(ev("MODIFIED", shard(0, 7, "Claimed", "pod-x")))  # an older write, still on its way
    assert cache.shards()[0]["status"]["holder"] == "pod-a"
    cache.apply(ev("MODIFIED", shard(0, 8, "Claimed", "pod-a")))  # our own, from the watch
    assert cache.shards()[0]["metadata"]["resourceVersion"] == "8"


def test_a_waiter_sleeps_until_a_change_comes() -> None:
    cache = ShardCache(None, UID)  # type: ignore[arg-type]
    cache.replace([shard(0, 5, "Claimed", "pod-b")], "5")
    seen = cache.version
    assert cache.wait(seen, 0.01) == seen  # nothing came: back after the timeout
    woke = threading.Event()

    def waiter() -> None:
        if cache.wait(seen, 120) > seen:
            woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    cache.apply(bookmark(6))  # not a change: the waiter sleeps on
    assert not woke.wait(0.05)
    cache.apply(ev("MODIFIED", shard(0, 7)))  # requeued
    t.join(120)
    assert woke.is_set()


class ScriptedSource:
    """Lists and watches that answer as scripted; a watch with no script left blocks until closed."""

    ns, job = "ns", "j"

    def __init__(self, lists: list[Any], watches: list[list[Any]]) -> None:
        self.lists, self.watches = lists, watches
        self.listed = 0
        self.watched_from: list[str] = []
        self.idle = threading.Event()
        self.closed = threading.Event()

    def list_shards_at(self, uid: str, until: threading.Event | None = None) -> tuple[list[JSON], str]:
        assert uid == UID
        self.listed += 1
        answer = self.lists.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]

    def watch_shards(
        self, uid: str, resource_version: str, until: threading.Event | None = None
    ) -> Iterator[JSON]:
        self.watched_from.append(resource_version)
        if not self.watches:
            self.idle.set()
            self.closed.wait(120)
            return
        for item in self.watches.pop(0):
            if isinstance(item, BaseException):
                raise item
            yield item


def test_the_watch_thread_resumes_relists_on_gone_and_on_garbage() -> None:
    import urllib3

    source = ScriptedSource(
        lists=[
            ([shard(0, 1), shard(1, 2)], "10"),
            ([shard(1, 2)], "30"),
            ([shard(1, 40, "Done", "b")], "41"),
        ],
        watches=[
            [ev("MODIFIED", shard(0, 11, "Claimed", "b")), bookmark(15)],  # the server ends it
            [ev("DELETED", shard(0, 16)), GONE],  # resumed at 15; then too old: relist
            [
                ev("MODIFIED", shard(1, 33, "Claimed", "b")),
                urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead"),
            ],
            [urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out")],  # type: ignore[arg-type]
            ["not an event"],  # unreadable: only a list is sure
        ],
    )
    cache = ShardCache(source, UID).start()
    try:
        cache.wait_synced(120)
        assert source.idle.wait(120), "the watch thread did not get through its script"
        # Dropped and silent connections resume where they were (33); 410 and garbage relist.
        assert source.watched_from == ["10", "15", "30", "33", "33", "41"]
        assert source.listed == 3
        assert cache.error is None
        assert [s["status"]["state"] for s in cache.shards()] == ["Done"]
        cache.check()
    finally:
        source.closed.set()
        cache.close()


def test_a_refused_watch_stops_the_cache_and_names_the_service_account() -> None:
    source = ScriptedSource(lists=[ApiException(status=403, reason="Forbidden")], watches=[])
    cache = ShardCache(source, UID).start()
    with pytest.raises(ImageBatchError, match=r"spec\.workers\.serviceAccountName.*watch"):
        cache.wait_synced(120)
    assert source.listed == 1, "a refusal is not retried"


def test_an_outage_is_waited_out() -> None:
    source = ScriptedSource(
        lists=[
            ApiException(status=503, reason="Service Unavailable"),
            TimeoutError("read"),
            ([shard(0, 1)], "2"),
        ],
        watches=[],
    )
    cache = ShardCache(source, UID).start()
    try:
        cache.wait_synced(120)
        assert names(cache.pending()) == [0] and source.listed == 3
    finally:
        source.closed.set()
        cache.close()


def test_a_closed_cache_stops_retrying() -> None:
    class Down(ScriptedSource):
        def list_shards_at(self, uid: str, until: threading.Event | None = None) -> tuple[list[JSON], str]:
            self.listed += 1
            raise ApiException(status=503, reason="Service Unavailable")

    source = Down([], [])
    cache = ShardCache(source, UID).start()
    assert cache._thread is not None
    while source.listed < 2:
        cache.wait(cache.version, 0.05)
    cache.close()
    cache._thread.join(60)
    assert not cache._thread.is_alive()
    listed = source.listed
    assert cache.wait(cache.version, 0.2) == cache.version and source.listed == listed


def test_a_lost_race_hides_the_shard_until_its_newer_version_comes() -> None:
    cache = ShardCache(None, UID)  # type: ignore[arg-type]
    cache.replace([shard(0, 5), shard(1, 6)], "6")
    cache.lost_race(shard(0, 4))  # a refused write from an older copy than the cache's: no news
    assert names(cache.pending()) == [0, 1]
    cache.lost_race(shard(0, 5))
    assert names(cache.pending()) == [1], "tried and lost: not tried again from the same version"
    cache.apply(ev("MODIFIED", shard(0, 9)))  # released by whoever won it: Pending again
    assert names(cache.pending()) == [0, 1]


def test_candidates_follow_the_pods_claim_order_through_every_change() -> None:
    from imagebatch.worker import claims

    cache = ShardCache(None, UID, pod="pod-a")  # type: ignore[arg-type]
    cache.replace([shard(i, i + 1) for i in range(50)], "60")

    def expected(k: int) -> list[str]:
        return [s["metadata"]["name"] for s in claims.ranked(cache.pending(), "pod-a")[:k]]

    def got(k: int) -> list[str]:
        return [s["metadata"]["name"] for s in cache.candidates(k)]

    assert got(3) == expected(3) and got(50) == expected(50) and got(80) == expected(50)
    first = cache.candidates(1)[0]
    i = int(first["spec"]["index"])
    cache.apply(ev("MODIFIED", shard(i, 70, "Claimed", "pod-b")))
    assert got(3) == expected(3) and first["metadata"]["name"] not in got(50)
    cache.lost_race(cache.candidates(1)[0])
    assert got(5) == expected(5)
    cache.apply(ev("MODIFIED", shard(i, 71)))  # requeued: back in its place
    assert got(1) == [first["metadata"]["name"]] and got(10) == expected(10)
