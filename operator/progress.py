"""Counts, throughput and ETA from the shards. Pure.

Throughput comes from the items the workers report (RateMeter: samples of Done shards' sizes plus
Claimed shards' itemsDone, one per reconcile pass), so a job with big shards shows its rate while
a shard is being made. Right after the operator starts the meter has one sample; then the rate is
measured from shard completions (the time a shard was marked Done and its size), which needs no
memory and survives a restart.

The rate that IMG/S and ETA show is MakingRate's: the pace of image making, from each claim's own
report times (leaseRenewTime, the worker's clock: workers claim a shard after they loaded the
model, so load time never counts), shown from the first batch that a worker stored. RateMeter,
which divides by the operator's pass times, is the fallback while MakingRate has nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from imagebatch.api import ITEM_ID_RE, ItemCounts, ShardCounts
from imagebatch.holders import holder_pod
from imagebatch.shardstate import shard_status
from imagebatch.timeutil import parse_time

RATE_WINDOW_SECONDS = 120.0
# The item-based meter: its window, how many samples it keeps, and the shortest span it divides by
# (two passes a moment apart would otherwise turn one stored batch into a spike).
METER_WINDOW_SECONDS = 60.0
METER_MAX_SAMPLES = 30
METER_MIN_SPAN_SECONDS = 1.0


@dataclass
class Tally:
    items: ItemCounts = field(default_factory=ItemCounts)
    shards: ShardCounts = field(default_factory=ShardCounts)
    holders: set[str] = field(default_factory=set)  # pods holding a claim
    completions: list[tuple[datetime, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # of Failed shards, in shard order
    claims: list[ClaimSample] = field(default_factory=list)  # Claimed and Done shards, for MakingRate
    item_failures: int = 0  # items of Done shards the engine could not make (errors.jsonl)
    failed_items: list[str] = field(default_factory=list)  # the first of them, in shard order


@dataclass(frozen=True)
class ClaimSample:
    """One claim as a pass saw it: (shard, attempt) is the claim; the rest as the worker wrote it."""

    shard: str
    attempt: int
    holder: str
    state: str  # Claimed or Done
    reported: datetime | None  # leaseRenewTime: the claim, each progress report, the completion
    items: int  # itemsDone
    seconds: float | None  # a Done shard: the time its completing attempt took


def shard_size(shard: dict[str, Any]) -> int:
    spec = shard.get("spec") or {}
    return int(spec.get("end", 0)) - int(spec.get("start", 0))


def tally(shards: Iterable[dict[str, Any]], total_items: int) -> Tally:
    t = Tally()
    done = failed = 0
    counts = {"Pending": 0, "Claimed": 0, "Done": 0, "Failed": 0}
    for shard in sorted(shards, key=lambda s: int((s.get("spec") or {}).get("index", 0))):
        st = shard_status(shard)
        size = shard_size(shard)
        counts[st.state] += 1
        if st.state in ("Claimed", "Done") and st.holder:
            reported = parse_time(st.lease_renew_time)
            t.claims.append(
                ClaimSample(
                    shard["metadata"]["name"],
                    st.attempt,
                    st.holder,
                    st.state,
                    reported,
                    st.items_done,
                    st.seconds,
                )
            )
        if st.state == "Done":
            # A Done shard's failed items are failed, not done: they cost the items, not the shard.
            lost = min(st.items_failed, size)
            done += size - lost
            failed += lost
            t.item_failures += lost
            t.failed_items += [i for i in st.failed_items or [] if ITEM_ID_RE.match(i)][
                : 5 - len(t.failed_items)
            ]
            when = parse_time(st.lease_renew_time)
            if when is not None:
                t.completions.append((when, size))
        elif st.state == "Claimed":
            done += min(st.items_done, size)
            if st.holder:
                t.holders.add(holder_pod(st.holder))  # busy pods, not engine processes
        elif st.state == "Failed":
            failed += size
            t.errors.append(f"{shard['metadata']['name']}: {st.error or 'failed'}")
    t.items = ItemCounts(total=total_items, done=done, failed=failed)
    t.shards = ShardCounts(
        total=sum(counts.values()),
        pending=counts["Pending"],
        claimed=counts["Claimed"],
        done=counts["Done"],
        failed=counts["Failed"],
    )
    return t


def images_per_second(
    completions: Iterable[tuple[datetime, int]],
    now: datetime,
    started: datetime | None,
    window: float = RATE_WINDOW_SECONDS,
) -> float:
    """Items of shards completed in the last `window` seconds (or since the start, if later)."""
    span = window
    if started is not None:
        span = min(window, max(1.0, (now - started).total_seconds()))
    recent = sum(n for t, n in completions if (now - t).total_seconds() <= span)
    return recent / span if span > 0 else 0.0


class RateMeter:
    """Images per second of one job from the items done seen at each reconcile pass.

    Keeps the samples of the last `window` seconds, plus the newest older one as the anchor the
    rate is measured from, at most `max_samples` of them (passes closer together than
    window / max_samples update the newest sample instead of adding one). Only increases of the
    items done count: when a requeued shard's itemsDone returns to 0 the meter takes the lower
    count as its new base, so the rate is never negative (the next holder's skipping of stored
    images counts again, a brief overestimate, never a 0 while images are being made).
    """

    def __init__(
        self,
        window: float = METER_WINDOW_SECONDS,
        max_samples: int = METER_MAX_SAMPLES,
        min_span: float = METER_MIN_SPAN_SECONDS,
    ) -> None:
        self.window = window
        self.min_gap = window / max_samples
        self.min_span = min_span
        self._last_items: int | None = None
        self._made = 0  # sum of the increases seen so far
        self._samples: deque[tuple[float, int]] = deque(maxlen=max_samples)  # (time, made)

    def observe(self, now_monotonic: float, items_done: int, fallback: float = 0.0) -> float:
        """Adds a sample; returns the rate over the window, or `fallback` with only one sample
        (just started: pass the completion-based images_per_second)."""
        if self._last_items is not None:
            self._made += max(0, items_done - self._last_items)
        self._last_items = items_done
        sample = (now_monotonic, self._made)
        s = self._samples
        if len(s) >= 2 and s[-1][0] - s[-2][0] < self.min_gap:
            s[-1] = sample
        else:
            s.append(sample)
        # Drop what is older than the window, but keep the newest such sample as the anchor.
        while len(s) > 2 and s[1][0] <= now_monotonic - self.window:
            s.popleft()
        if len(s) < 2:
            return fallback
        t0, made0 = s[0]
        span = now_monotonic - t0
        if span <= 0:
            return fallback  # a clock that did not move: nothing to divide by
        return (self._made - made0) / max(span, self.min_span)


HOLDER_MEMORY_SECONDS = 30.0  # how long an engine between two claims still counts with its last pace


class MakingRate:
    """Images per second of image making: the sum, over the engines (holders) that work, of each
    one's pace, measured on its claims from the worker's own report times.

    A claim seen with itemsDone 0 gives its start (leaseRenewTime at the claim); each later report
    (itemsDone, leaseRenewTime) gives the engine's pace since then. A claim first seen with images
    already stored is measured from that first sight instead, and a Done shard by its `seconds`.
    Model loading happens before a worker's first claim, so it is never part of a pace; the rate
    is 0 until some engine stored its first batch. An engine that finished a shard and claimed the
    next keeps its last pace for HOLDER_MEMORY_SECONDS (operator time), so the rate does not drop
    to 0 between two shards.
    """

    def __init__(self, memory: float = HOLDER_MEMORY_SECONDS) -> None:
        self.memory = memory
        self._start: dict[tuple[str, int], tuple[datetime, int]] = {}  # claim -> (time, items)
        self._pace: dict[str, tuple[float, float]] = {}  # holder -> (images/s, operator time seen)

    def observe(self, claims: Iterable[ClaimSample], now_monotonic: float) -> float:
        live: set[tuple[str, int]] = set()
        for c in claims:
            key = (c.shard, c.attempt)
            if c.state == "Done":
                # Counted once, when the operator sees the claim it watched become Done.
                if self._start.pop(key, None) is not None and c.seconds and c.items > 0:
                    self._pace[c.holder] = (c.items / c.seconds, now_monotonic)
                continue
            live.add(key)
            if c.reported is None:
                continue
            start = self._start.setdefault(key, (c.reported, c.items))
            span = (c.reported - start[0]).total_seconds()
            if c.items > start[1] and span > 0:
                self._pace[c.holder] = ((c.items - start[1]) / span, now_monotonic)
            elif c.holder in self._pace:
                self._pace[c.holder] = (self._pace[c.holder][0], now_monotonic)  # still working
        self._start = {k: v for k, v in self._start.items() if k in live}
        self._pace = {h: p for h, p in self._pace.items() if now_monotonic - p[1] <= self.memory}
        return sum(p for p, _ in self._pace.values())


def format_duration(seconds: float) -> str:
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


def eta(remaining: int, rate: float) -> str:
    if remaining <= 0:
        return "0s"
    if rate <= 0:
        return ""
    return format_duration(remaining / rate)


def progress_text(items: ItemCounts) -> str:
    return f"{items.done}/{items.total}"
