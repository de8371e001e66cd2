"""Counts, throughput from shard completions, ETA."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from imagebatch.operator.progress import eta, format_duration, images_per_second, progress_text, tally
from imagebatch.timeutil import format_micro

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def shard(i: int, size: int, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": f"j-s{i:05d}"},
        "spec": {"index": i, "start": i * size, "end": (i + 1) * size},
        "status": status,
    }


def test_tally_counts_items_and_shards_by_state() -> None:
    shards = [
        shard(0, 10, state="Done", leaseRenewTime=format_micro(NOW)),
        shard(1, 10, state="Claimed", holder="w1", itemsDone=4),
        shard(2, 10, state="Failed", error="boom"),
        shard(3, 10),  # just created: Pending
    ]
    t = tally(shards, 40)
    assert (t.items.total, t.items.done, t.items.failed) == (40, 14, 10)
    assert (t.shards.total, t.shards.pending, t.shards.claimed, t.shards.done, t.shards.failed) == (
        4,
        1,
        1,
        1,
        1,
    )
    assert t.holders == {"w1"}
    assert t.errors == ["j-s00002: boom"]
    assert progress_text(t.items) == "14/40"


def test_rate_counts_recent_completions_only() -> None:
    completions = [
        (NOW - timedelta(seconds=10), 100),
        (NOW - timedelta(seconds=50), 100),
        (NOW - timedelta(seconds=500), 999),
    ]
    assert images_per_second(completions, NOW, started=None, window=60) == 200 / 60
    # A job that started 20 s ago is measured over 20 s, not the whole window.
    assert images_per_second(completions[:1], NOW, started=NOW - timedelta(seconds=20), window=60) == 5.0


def test_eta_and_durations() -> None:
    assert eta(600, 10.0) == "1m00s"
    assert eta(0, 0.0) == "0s"
    assert eta(10, 0.0) == ""
    assert format_duration(3 * 3600 + 125) == "3h02m"
    assert format_duration(42) == "42s"
