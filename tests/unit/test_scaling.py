"""desired_replicas: clamp(ceil(claimable / shardsPerReplica)), up at once, down damped."""

from __future__ import annotations

import pytest

from imagebatch.operator.workers import desired_replicas, target_replicas


@pytest.mark.parametrize(
    ("claimable", "per", "lo", "hi", "want"),
    [
        (0, 2, 0, 4, 0),  # no backlog, no workers
        (0, 2, 1, 4, 0),  # minReplicas applies only while there is work
        (1, 2, 0, 4, 1),  # ceil, not floor
        (3, 2, 0, 4, 2),
        (100, 2, 0, 4, 4),  # clamped to maxReplicas
        (1, 1, 3, 8, 3),  # raised to minReplicas
    ],
)
def test_target(claimable: int, per: int, lo: int, hi: int, want: int) -> None:
    assert target_replicas(claimable, per, lo, hi) == want


def test_scale_up_is_immediate() -> None:
    d = desired_replicas(40, 2, 0, 4, current=1, last_scale_down_time=99.0, now=100.0)
    assert d.replicas == 4 and not d.scaled_down


def test_scale_down_waits_for_the_cool_down() -> None:
    d = desired_replicas(0, 2, 0, 4, current=4, last_scale_down_time=95.0, now=100.0, cool_down=30)
    assert d.replicas == 4 and not d.scaled_down


def test_scale_down_is_bounded_per_step() -> None:
    d = desired_replicas(1, 2, 0, 8, current=8, last_scale_down_time=None, now=100.0, max_step=2)
    assert d.replicas == 6 and d.scaled_down
    d = desired_replicas(
        1, 2, 0, 8, current=6, last_scale_down_time=100.0, now=200.0, cool_down=30, max_step=2
    )
    assert d.replicas == 4 and d.scaled_down


def test_never_below_busy_workers() -> None:
    # The Job controller picks victims blindly: keep every worker that holds a claim.
    d = desired_replicas(0, 2, 0, 4, current=3, last_scale_down_time=None, now=100.0, busy=3)
    assert d.replicas == 3
    d = desired_replicas(0, 2, 0, 4, current=3, last_scale_down_time=None, now=100.0, busy=2, max_step=5)
    assert d.replicas == 2


@pytest.mark.parametrize("flag", ["done", "suspended"])
def test_zero_when_done_or_suspended(flag: str) -> None:
    d = desired_replicas(40, 2, 1, 4, current=4, last_scale_down_time=99.0, now=100.0, busy=4, **{flag: True})
    assert d.replicas == 0 and d.scaled_down
