"""Operator-side lease review and the shared shard state machine (imagebatch/shardstate.py: fencing)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from imagebatch import shardstate
from imagebatch.api import ImageBatchShardStatus
from imagebatch.operator.leases import ClaimClock, review
from imagebatch.worker import claims

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def shard(name: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "resourceVersion": "7"},
        "spec": {"index": 0, "start": 0, "end": 10},
        "status": status,
    }


def claimed(
    name: str, holder: str, attempt: int = 1, renewed: str = "t0", done: int = 0, **more: Any
) -> dict[str, Any]:
    return shard(
        name, state="Claimed", holder=holder, attempt=attempt, leaseRenewTime=renewed, itemsDone=done, **more
    )


LEASE, DEADLINE = 30, 100


def run(passes: list[tuple[float, list[dict[str, Any]]]], live: set[str], max_attempts: int = 3) -> list[Any]:
    """Feeds the clock one view of the shards per pass (at operator time t); the last pass's review."""
    clock = ClaimClock()
    for t, shards in passes:
        clock.observe(shards, t, gap=LEASE / 2)
    t, shards = passes[-1]
    return review(shards, live, clock, t, LEASE, DEADLINE, max_attempts)


def every(step: float, until: float, view: Any) -> list[tuple[float, list[dict[str, Any]]]]:
    """Passes every `step` seconds of operator time, each seeing view(t)."""
    out, t = [], 0.0
    while t <= until:
        out.append((t, view(t)))
        t += step
    return out


# (case, passes, live pods, expected reason or None)
CASES = [
    ("fresh claim of a live pod", every(5, 10, lambda t: [claimed("a", "pod-1")]), {"pod-1"}, None),
    (
        "renewed lease (the worker's times may be anything: only a change counts)",
        every(5, 60, lambda t: [claimed("a", "pod-1", renewed=f"1999-{int(t)}", done=int(t))]),
        {"pod-1"},
        None,
    ),
    (
        "lease not renewed for longer than leaseSeconds of operator time",
        every(5, 35, lambda t: [claimed("a", "pod-1", renewed="2999-01-01T00:00:00Z")]),
        {"pod-1"},
        "LeaseExpired",
    ),
    ("holder pod gone: at once", [(0.0, [claimed("a", "pod-1")])], {"pod-2"}, "HolderGone"),
    (
        "renewing but itemsDone stuck past the progress deadline (a hung engine)",
        every(5, 105, lambda t: [claimed("a", "pod-1", renewed=f"r{int(t)}", done=3)]),
        {"pod-1"},
        "ProgressDeadlineExceeded",
    ),
    (
        "renewing and progressing slowly stays",
        every(5, 300, lambda t: [claimed("a", "pod-1", renewed=f"r{int(t)}", done=int(t) // 90)]),
        {"pod-1"},
        None,
    ),
    (
        "an operator outage (no pass for longer than the gap) holds no silence against the worker",
        [(0.0, [claimed("a", "pod-1")]), (40.0, [claimed("a", "pod-1")])],
        {"pod-1"},
        None,
    ),
    (
        "a new attempt restarts both clocks",
        [
            *every(5, 25, lambda t: [claimed("a", "pod-1")]),
            (30.0, [claimed("a", "pod-2", attempt=2)]),
            (55.0, [claimed("a", "pod-2", attempt=2)]),
        ],
        {"pod-2"},
        None,
    ),
    (
        "a rank of a live multi-GPU pod is the pod's claim",
        [(0.0, [claimed("a", "w-abc/1")])],
        {"w-abc"},
        None,
    ),
]


@pytest.mark.parametrize(("passes", "live", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_review(
    passes: list[tuple[float, list[dict[str, Any]]]], live: set[str], expected: str | None
) -> None:
    out = run(passes, live)
    assert [t.reason for t in out] == ([expected] if expected else [])
    for t in out:
        assert t.status.state == "Pending" and t.status.holder is None and t.status.lease_renew_time is None
        assert t.status.failures == 1 and t.status.attempt == t.shard["status"]["attempt"]


def test_last_failure_fails_the_shard_with_its_last_error() -> None:
    s = claimed("a", "pod-1", attempt=5, failures=2, error="CUDA error: device-side assert")
    (t,) = run([(0.0, [s])], {"pod-2"}, max_attempts=3)
    assert t.status.state == "Failed" and t.status.failures == 3
    assert "CUDA error" in (t.status.error or "") and "pod-1" in (t.status.error or "")


def test_pending_done_and_failed_shards_are_not_touched() -> None:
    shards = [
        shard("p"),
        shard("d", state="Done", attempt=1),
        shard("f", state="Failed", attempt=3),
        {"metadata": {"name": "new"}},
    ]
    assert run([(0.0, shards), (1000.0, shards)], set()) == []


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
    assert shardstate.errored(st, "boom", max_attempts=3).failures == 1
    # Claims do not use attempts, failures do: many releases (SIGTERM) and a claim still retry.
    many = st.model_copy(update={"attempt": 9, "failures": 1})
    assert shardstate.released(many).failures == 1
    assert shardstate.errored(many, "boom", max_attempts=3).state == "Pending"
    last = st.model_copy(update={"attempt": 3, "failures": 2})
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
