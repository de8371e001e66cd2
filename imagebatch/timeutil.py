"""RFC 3339 times as the Kubernetes API writes them."""

from __future__ import annotations

from datetime import UTC, datetime


def now_utc() -> datetime:
    return datetime.now(UTC)


def format_time(t: datetime) -> str:
    # Second precision, "Z": what metav1.Time serialises to, so kubectl and CEL read it.
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_micro(t: datetime) -> str:
    """Microsecond precision, for leases: a lease renewed twice in a second must still move."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    try:
        t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)
