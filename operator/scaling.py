"""How many worker pods a job wants. Pure.

`clamp(ceil(claimable / shardsPerReplica), minReplicas, maxReplicas)`; up at once (a backlog
waiting on GPUs is the expensive case), down damped: only after `cool_down` seconds since the last
scale-down, and by at most `max_step` pods, because a worker that is cut off mid-shard loses
its batch, and a backlog that flickers must not make pods churn. Zero when done or suspended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_COOL_DOWN_SECONDS = 30.0
DEFAULT_MAX_STEP = 2


@dataclass(frozen=True)
class ScaleDecision:
    replicas: int
    scaled_down: bool  # True when this decision lowered the count (restart the cool-down)


def target_replicas(claimable: int, shards_per_replica: int, min_replicas: int, max_replicas: int) -> int:
    """The undamped target for a backlog of `claimable` shards; 0 when there is no backlog."""
    if claimable <= 0:
        return 0
    want = math.ceil(claimable / max(1, shards_per_replica))
    return max(min_replicas, min(max_replicas, want))


def desired_replicas(
    claimable: int,
    shards_per_replica: int,
    min_replicas: int,
    max_replicas: int,
    current: int,
    last_scale_down_time: float | None,
    now: float,
    *,
    done: bool = False,
    suspended: bool = False,
    busy: int = 0,
    cool_down: float = DEFAULT_COOL_DOWN_SECONDS,
    max_step: int = DEFAULT_MAX_STEP,
) -> ScaleDecision:
    """The replica count to apply now.

    `busy` is the number of workers that started (or hold a claim): never scale below it while
    the job runs, since the Job controller picks which pods to delete without knowing which are
    working. Idle workers leave by themselves (a worker exits when nothing is left to claim), so
    scaling down only cuts pods that have not started yet.
    """
    if done or suspended:
        return ScaleDecision(0, current > 0)
    target = max(
        target_replicas(claimable, shards_per_replica, min_replicas, max_replicas), min(busy, max_replicas)
    )
    if target >= current:
        return ScaleDecision(target, False)
    if last_scale_down_time is not None and now - last_scale_down_time < cool_down:
        return ScaleDecision(current, False)
    return ScaleDecision(max(target, current - max_step), True)
