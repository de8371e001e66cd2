"""Counts, throughput and ETA from the shards. Pure.

Throughput is measured from shard completions (the time a shard was marked Done and its size)
over a recent window, so it needs no memory in the operator and survives its restart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from imagebatch.api import ItemCounts, ShardCounts
from imagebatch.holders import holder_pod
from imagebatch.shardstate import shard_status
from imagebatch.timeutil import parse_time

RATE_WINDOW_SECONDS = 120.0


@dataclass
class Tally:
    items: ItemCounts = field(default_factory=ItemCounts)
    shards: ShardCounts = field(default_factory=ShardCounts)
    holders: set[str] = field(default_factory=set)  # pods holding a claim
    completions: list[tuple[datetime, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # of Failed shards, in shard order


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
        if st.state == "Done":
            done += size
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
