"""The cluster worker's claims against a fake API: conflicts, and fencing of a zombie."""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

from imagebatch import shardstate
from imagebatch.timeutil import now_utc
from imagebatch.worker import claims
from imagebatch.worker.cluster import Claim, LeaseKeeper, Worker

JSON = dict[str, Any]


class FakeShardApi:
    """Shards with resourceVersions; a write with a stale one is refused, as the API server does."""

    def __init__(self, n: int) -> None:
        self.shards = {
            f"j-s{i:05d}": {
                "apiVersion": "imagebatch.dev/v1alpha1",
                "kind": "ImageBatchShard",
                "metadata": {"name": f"j-s{i:05d}", "resourceVersion": "1"},
                "spec": {"jobName": "j", "index": i, "start": i * 10, "end": i * 10 + 10},
            }
            for i in range(n)
        }
        self.before_write: list[str] = []  # names whose next write another writer beats

    def get_job(self) -> JSON:
        return {
            "metadata": {"name": "j", "namespace": "ns", "uid": "u"},
            "spec": {"model": {"name": "builtin:tiny"}, "prompts": ["a"], "output": {"uri": "/tmp/never"}},
        }

    def list_shards(self, uid: str = "u") -> list[JSON]:
        assert uid == "u", "the worker lists the shards of its own job's UID"
        return [copy.deepcopy(s) for s in self.shards.values()]

    def get_shard(self, name: str) -> JSON | None:
        return copy.deepcopy(self.shards.get(name))

    def replace_shard_status(self, shard: JSON, status: JSON) -> JSON | None:
        name = shard["metadata"]["name"]
        current = self.shards[name]
        if name in self.before_write:
            self.before_write.remove(name)
            self._bump(current)  # someone else wrote first
        if shard["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"]:
            return None
        current["status"] = copy.deepcopy(status)
        self._bump(current)
        return copy.deepcopy(current)

    @staticmethod
    def _bump(obj: JSON) -> None:
        obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)


def worker(api: FakeShardApi, pod: str) -> Worker:
    return Worker(api, pod, threading.Event())  # type: ignore[arg-type]


def test_a_lost_race_moves_on_to_another_shard() -> None:
    api = FakeShardApi(3)
    w = worker(api, "pod-a")
    first = claims.claim_order(api.list_shards(), "pod-a")[0]["metadata"]["name"]
    api.before_write.append(first)
    claim = w.try_claim(api.list_shards())
    assert claim is not None and claim.name != first
    st = api.shards[claim.name]["status"]
    assert st["state"] == "Claimed" and st["holder"] == "pod-a" and st["attempt"] == 1


def test_two_workers_never_hold_the_same_shard() -> None:
    api = FakeShardApi(1)
    a, b = worker(api, "pod-a"), worker(api, "pod-b")
    listed = api.list_shards()  # both listed before either claimed
    assert a.try_claim(listed) is not None
    assert b.try_claim(listed) is None


def test_a_zombie_cannot_complete_a_reclaimed_shard() -> None:
    api = FakeShardApi(1)
    a, b = worker(api, "pod-a"), worker(api, "pod-b")
    claim_a = a.try_claim(api.list_shards())
    assert claim_a is not None
    # The operator requeues the expired claim; pod-b claims it (attempt 2).
    api.shards[claim_a.name]["status"].update(state="Pending", holder=None)
    claim_b = b.try_claim(api.list_shards())
    assert claim_b is not None and claim_b.attempt == 2
    assert not a.fenced_write(claim_a, lambda st: shardstate.done(st, now_utc(), 10, 1.0))
    assert api.shards[claim_a.name]["status"]["state"] == "Claimed"
    assert api.shards[claim_a.name]["status"]["holder"] == "pod-b"
    # Same pod, old attempt: also refused.
    assert not b.fenced_write(Claim(claim_b.name, 0, 0, 10, 1), shardstate.released)
    assert b.fenced_write(claim_b, lambda st: shardstate.done(st, now_utc(), 10, 1.0))
    assert api.shards[claim_b.name]["status"]["state"] == "Done"


def test_a_fenced_write_retries_a_conflict_with_another_writer() -> None:
    api = FakeShardApi(1)
    a = worker(api, "pod-a")
    claim = a.try_claim(api.list_shards())
    assert claim is not None
    api.before_write.append(claim.name)  # e.g. the lease thread wrote in between
    assert a.fenced_write(claim, lambda st: shardstate.done(st, now_utc(), 10, 1.0))
    assert api.shards[claim.name]["status"]["state"] == "Done"


def test_progress_reaches_the_shard_long_before_the_lease_is_due() -> None:
    """A shard shorter than a lease period still shows progress: it is reported at a bounded rate
    (PROGRESS_SECONDS), not only when the lease is renewed (here every 40 s)."""
    api = FakeShardApi(1)
    w = worker(api, "pod-a")
    assert w.spec.retries.lease_seconds / 3 > 30  # the default lease: renewals 40 s apart
    claim = w.try_claim(api.list_shards())
    assert claim is not None
    done = [0]
    lease = LeaseKeeper(w, claim, lambda: done[0])
    lease.start()
    try:
        done[0] = 7
        deadline = time.monotonic() + 20  # a bound well under the 40 s renewal, not a timing
        while api.shards[claim.name]["status"].get("itemsDone") != 7:
            assert time.monotonic() < deadline, "progress waited for the lease renewal"
            time.sleep(0.05)
    finally:
        lease.close()
    assert not lease.lost.is_set()


def test_a_lease_keeper_flags_a_claim_that_is_no_longer_ours() -> None:
    api = FakeShardApi(1)
    w = worker(api, "pod-a")
    claim = w.try_claim(api.list_shards())
    assert claim is not None
    api.shards[claim.name]["status"].update(holder="pod-b", attempt=2)  # requeued and taken
    lease = LeaseKeeper(w, claim, lambda: 3)
    lease.report_now()
    assert lease.lost.is_set()
    assert api.shards[claim.name]["status"]["holder"] == "pod-b"


def test_each_pod_has_its_own_order_and_keeps_it_as_shards_are_taken() -> None:
    shards = FakeShardApi(400).list_shards()
    firsts = {claims.claim_order(shards, f"pod-{i}")[0]["metadata"]["name"] for i in range(64)}
    assert len(firsts) > 50, "64 pods should mostly want different shards first"
    order = [s["metadata"]["name"] for s in claims.claim_order(shards, "pod-a")]
    taken = set(order[1:200:3])
    rest = [s for s in shards if s["metadata"]["name"] not in taken]
    assert [s["metadata"]["name"] for s in claims.claim_order(rest, "pod-a")] == [
        n for n in order if n not in taken
    ]


def _cached_worker(api: FakeShardApi, pod: str) -> tuple[Worker, list[int]]:
    """A worker whose cache holds the API's shards (fed by hand); the count of LISTs it makes."""
    from imagebatch.names import LABEL_JOB, LABEL_JOB_UID, shard_name
    from imagebatch.worker.shardcache import ShardCache

    for i, old in enumerate(list(api.shards)):
        shard = api.shards.pop(old)
        # Of job j (UID u) by every name it carries (shardplan.forgery).
        shard["metadata"]["name"] = shard_name("j", "u", i)
        shard["metadata"]["labels"] = {LABEL_JOB_UID: "u", LABEL_JOB: "j"}
        shard["metadata"]["ownerReferences"] = [{"kind": "ImageBatchJob", "uid": "u", "name": "j"}]
        api.shards[shard["metadata"]["name"]] = shard
    lists = [0]
    listed = api.list_shards
    api.list_shards = lambda uid="u": (lists.__setitem__(0, lists[0] + 1), listed(uid))[1]  # type: ignore[method-assign]
    w = worker(api, pod)
    w.cache = ShardCache(None, "u", pod)  # type: ignore[arg-type]
    w.cache.replace(listed(), "1")
    return w, lists


def test_a_worker_with_nothing_pending_leaves_while_another_holds_a_claim() -> None:
    """The backlog is one claimed shard: the idle worker lists once, to be sure, and leaves (its
    pod's quota goes back to Kueue) rather than wait for a claim that may come back."""
    api = FakeShardApi(2)
    w, lists = _cached_worker(api, "pod-a")
    done, theirs = api.shards.values()
    done["status"] = {"state": "Done", "holder": "pod-a", "attempt": 1}
    theirs["status"] = {"state": "Claimed", "holder": "pod-b", "attempt": 1}
    assert w.cache is not None
    w.cache.replace(api.list_shards(), "2")
    lists[0] = 0
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(w.next_claim()))
    t.start()
    t.join(60)  # a safety net: the old rule waited here for pod-b's claim to end
    w.stop.set()
    assert result == [None], "the idle worker stayed while another held a claim"
    assert lists[0] == 1
    assert sorted(s["status"]["state"] for s in w.last_list) == ["Claimed", "Done"]
    assert theirs["status"]["holder"] == "pod-b"  # left alone


def test_a_worker_claims_a_shard_its_watch_missed_before_it_leaves() -> None:
    """The cache says nothing is Pending, the fresh list says a claim came back: take it."""
    api = FakeShardApi(2)
    w, _ = _cached_worker(api, "pod-a")
    done, returned = api.shards.values()
    done["status"] = {"state": "Done", "holder": "pod-a", "attempt": 1}
    returned["status"] = {"state": "Claimed", "holder": "pod-b", "attempt": 1}
    assert w.cache is not None
    w.cache.replace(api.list_shards(), "2")
    # The operator took pod-b's claim back; the watch has not brought it yet.
    returned["status"] = {"state": "Pending", "holder": None, "attempt": 1, "failures": 1}
    FakeShardApi._bump(returned)
    claim = w.next_claim()
    assert claim is not None and claim.name == returned["metadata"]["name"] and claim.attempt == 2
    assert returned["status"]["holder"] == "pod-a"
