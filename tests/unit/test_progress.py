"""Counts, throughput from shard completions and from reported items (RateMeter), ETA."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from imagebatch.operator.progress import (
    ClaimSample,
    MakingRate,
    RateMeter,
    eta,
    format_duration,
    images_per_second,
    progress_text,
    tally,
)
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


def run_meter(samples: list[tuple[float, int]], window: float = 60, max_samples: int = 30) -> list[float]:
    meter = RateMeter(window=window, max_samples=max_samples)
    return [meter.observe(t, n) for t, n in samples]


def test_meter_big_shard_shows_a_rate_at_every_sample_after_the_first_image() -> None:
    # One 200-item shard, Claimed throughout (no completion: the old rate read 0), itemsDone
    # reported every second after 5 s of model loading, one image each 1.5 s.
    samples = [(float(t), 0 if t < 5 else min(200, int((t - 5) / 1.5) + 1)) for t in range(0, 300)]
    rates = run_meter(samples)
    first_image = next(i for i, (_, n) in enumerate(samples) if n > 0)
    assert all(r == 0 for r in rates[:first_image])
    assert all(r > 0 for r in rates[first_image:]), rates
    # Steady state: the rate is the workers' pace (2/3 image/s), not a spike.
    assert rates[100] == pytest.approx(1 / 1.5, rel=0.1)
    remaining = 200 - samples[100][1]
    assert eta(remaining, rates[100]) != ""


@pytest.mark.parametrize("max_samples", [30, 1000])  # the window, not the sample cap, forgets
def test_meter_no_progress_for_the_whole_window_reads_zero(max_samples: int) -> None:
    # 50 items in the first 10 s, then nothing for longer than the window.
    samples = [(float(t), min(50, 5 * t)) for t in range(0, 11)]
    samples += [(float(t), 50) for t in range(11, 80)]
    rates = run_meter(samples, window=60, max_samples=max_samples)
    assert rates[10] > 0
    assert rates[-1] == 0.0
    assert eta(100 - 50, rates[-1]) == ""


def test_meter_one_sample_falls_back_to_the_completion_rate() -> None:
    # The operator just restarted: one sample has no span; the caller's completion rate is used.
    meter = RateMeter()
    assert meter.observe(1000.0, 150, fallback=2.5) == 2.5
    # The items done before the restart are the base, not a burst of 150 images.
    assert meter.observe(1010.0, 160, fallback=2.5) == pytest.approx(1.0)


def test_meter_items_going_down_never_make_the_rate_negative() -> None:
    # A shard with 80 items done is requeued (its itemsDone back to 0) while another goes on.
    samples = [(0.0, 0), (10.0, 100), (20.0, 20), (30.0, 20), (40.0, 40)]
    rates = run_meter(samples)
    assert all(r >= 0 for r in rates), rates
    assert rates[2] == pytest.approx(100 / 20)  # the drop counts as no progress, not -80
    assert rates[4] == pytest.approx(120 / 40)  # progress after the drop counts from the new base


def test_meter_stays_bounded_and_measures_over_the_window() -> None:
    meter = RateMeter(window=60, max_samples=30)
    rate = 0.0
    for i in range(10_000):  # a pass every 0.1 s for 1000 s, 3 images/s
        rate = meter.observe(i / 10, 3 * i // 10)
    assert len(meter._samples) <= 30
    assert rate == pytest.approx(3.0, rel=0.05)
    # Two passes a moment apart do not divide a stored batch by a tiny span.
    m = RateMeter(min_span=1.0)
    m.observe(0.0, 0)
    assert m.observe(0.01, 8) == pytest.approx(8.0)


def claim(
    shard: str, items: int, at: float, state: str = "Claimed", holder: str = "w1", **kw: Any
) -> ClaimSample:
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=at)
    return ClaimSample(shard, kw.get("attempt", 1), holder, state, when, items, kw.get("seconds"))


def test_making_rate_starts_at_the_first_batch_and_leaves_out_model_load() -> None:
    """A worker loads its model for 50 s (no claim), claims s0 at t=50 and stores a batch of 4
    every 2 s: the rate is 0 until the first batch, then 2 images/s, not 4/52."""
    rate = MakingRate()
    assert rate.observe([], 0.0) == 0.0  # loading: nothing claimed
    assert rate.observe([claim("s0", 0, 50)], 50.0) == 0.0  # claimed, first batch not stored
    assert rate.observe([claim("s0", 4, 52)], 52.5) == pytest.approx(2.0)
    assert rate.observe([claim("s0", 8, 54)], 54.5) == pytest.approx(2.0)
    # s0 done (its attempt took 8 s for 16 images); s1 claimed, nothing stored yet: the pace stays.
    between = [claim("s0", 16, 58, state="Done", seconds=8.0), claim("s1", 0, 58)]
    assert rate.observe(between, 58.5) == pytest.approx(2.0)
    assert rate.observe(between, 60.0) == pytest.approx(2.0)
    assert eta(100, rate.observe(between, 61.0)) == "50s"


def test_making_rate_adds_the_engines_and_forgets_one_that_left() -> None:
    rate = MakingRate(memory=30)
    rate.observe([claim("s0", 0, 0, holder="a"), claim("s1", 0, 0, holder="b")], 0.0)
    both = [claim("s0", 4, 2, holder="a"), claim("s1", 2, 2, holder="b")]
    assert rate.observe(both, 2.0) == pytest.approx(3.0)
    # b finished and left; a goes on. After the holder memory, only a's pace counts.
    alone = [claim("s0", 8, 4, holder="a"), claim("s1", 4, 4, state="Done", holder="b", seconds=4.0)]
    assert rate.observe(alone, 4.0) == pytest.approx(3.0)
    assert rate.observe([claim("s0", 12, 6, holder="a")], 40.0) == pytest.approx(2.0)


def test_making_rate_of_a_claim_first_seen_with_images_counts_from_that_sight() -> None:
    rate = MakingRate()
    assert rate.observe([claim("s0", 6, 10)], 10.0) == 0.0  # its start is unknown
    assert rate.observe([claim("s0", 9, 13)], 13.0) == pytest.approx(1.0)
