"""Operator-side lease review and the shared shard state machine (imagebatch/shardstate.py: fencing)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from imagebatch import shardstate
from imagebatch.api import ImageBatchShardStatus
from imagebatch.operator.leases import review
from imagebatch.timeutil import format_micro
from imagebatch.worker import claims

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def shard(name: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "resourceVersion": "7"},
        "spec": {"index": 0, "start": 0, "end": 10},
        "status": status,
    }


def claimed(name: str, holder: str, age: float, attempt: int = 1) -> dict[str, Any]:
    return shard(
        name,
        state="Claimed",
        holder=holder,
        attempt=attempt,
        leaseRenewTime=format_micro(NOW - timedelta(seconds=age)),
    )


def test_fresh_claim_of_a_live_pod_is_left_alone() -> None:
    assert review([claimed("a", "pod-1", age=5)], {"pod-1"}, NOW, 30, 3) == []


def test_expired_lease_goes_back_to_pending_keeping_the_attempt() -> None:
    (t,) = review([claimed("a", "pod-1", age=31, attempt=2)], {"pod-1"}, NOW, 30, 3)
    assert t.reason == "LeaseExpired"
    assert t.status.state == "Pending" and t.status.attempt == 2
    assert t.status.holder is None and t.status.lease_renew_time is None
    assert "pod-1" in (t.status.error or "")


def test_gone_holder_is_requeued_before_the_lease_expires() -> None:
    (t,) = review([claimed("a", "pod-1", age=1)], {"pod-2"}, NOW, 30, 3)
    assert t.reason == "HolderGone" and t.status.state == "Pending"


def test_last_attempt_fails_the_shard_with_its_last_error() -> None:
    s = claimed("a", "pod-1", age=100, attempt=3)
    s["status"]["error"] = "CUDA error: device-side assert"
    (t,) = review([s], {"pod-1"}, NOW, 30, 3)
    assert t.status.state == "Failed"
    assert "CUDA error" in (t.status.error or "")


def test_pending_done_and_failed_shards_are_not_touched() -> None:
    shards = [
        shard("p"),
        shard("d", state="Done", attempt=1),
        shard("f", state="Failed", attempt=3),
        {"metadata": {"name": "new"}},
    ]
    assert review(shards, set(), NOW, 30, 3) == []


def test_claim_raises_the_attempt_and_fences_by_holder_and_attempt() -> None:
    st = shardstate.claimed(ImageBatchShardStatus(attempt=1, error="old"), "pod-9", NOW)
    assert st.state == "Claimed" and st.attempt == 2 and st.holder == "pod-9"
    assert shardstate.holds(st, "pod-9", 2)
    assert not shardstate.holds(st, "pod-9", 1)  # a zombie of the earlier attempt
    assert not shardstate.holds(st, "pod-8", 2)
    assert not shardstate.holds(shardstate.released(st), "pod-9", 2)


def test_done_release_error_and_fail() -> None:
    st = shardstate.claimed(ImageBatchShardStatus(), "w", NOW)
    done = shardstate.done(st, NOW, 10, 1.23456)
    assert done.state == "Done" and done.items_done == 10 and done.seconds == 1.235 and done.error is None
    assert shardstate.released(st).state == "Pending" and shardstate.released(st).attempt == 1
    assert shardstate.errored(st, "boom", max_attempts=3).state == "Pending"
    last = st.model_copy(update={"attempt": 3})
    assert shardstate.errored(last, "boom", max_attempts=3).state == "Failed"
    assert shardstate.failed(st, "ModelLoadError: x").error == "ModelLoadError: x"
    assert "holder" not in shardstate.dump(shardstate.released(st))


def test_claim_order_spreads_workers_over_pending_shards() -> None:
    shards = [
        {
            "metadata": {"name": f"s{i}"},
            "spec": {"index": i},
            "status": {"state": "Done" if i % 3 == 0 else "Pending"},
        }
        for i in range(12)
    ]
    a = claims.claim_order(shards, "worker-a")
    b = claims.claim_order(shards, "worker-b")
    assert sorted(s["spec"]["index"] for s in a) == [i for i in range(12) if i % 3]
    assert sorted(x["spec"]["index"] for x in b) == sorted(x["spec"]["index"] for x in a)
    assert claims.claim_order([], "w") == []


def test_claimed_by_others_keeps_an_idle_worker_waiting() -> None:
    mine = shard("a", state="Claimed", holder="me", attempt=1)
    theirs = shard("b", state="Claimed", holder="them", attempt=1)
    done = shard("c", state="Done", holder="them", attempt=1)
    assert claims.claimed_by_others([mine, theirs, done], "me")
    assert not claims.claimed_by_others([mine, done], "me")
    assert not claims.claimed_by_others([], "me")
