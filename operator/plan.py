"""What a pass decided: the new status and the actions that make the world match it. Types only.

decide.py makes a Plan from an observation; reconcile.py carries its actions out in order and
writes its status, and nothing else: an action that meets an object it must not touch (someone
else's, or an earlier incarnation's) stops the plan there, and the next pass observes why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from imagebatch.api import ImageBatchJobSpec, ImageBatchJobStatus, ImageBatchShardStatus
from imagebatch.operator.progress import Tally
from imagebatch.reasons import EventReason

JSON = dict[str, Any]


@dataclass(frozen=True)
class CreateShards:
    manifests: list[JSON]


@dataclass(frozen=True)
class WriteShardStatus:
    """A lost claim returned to Pending, or a shard failed out of attempts (leases.review)."""

    shard: JSON
    status: ImageBatchShardStatus
    reason: EventReason


@dataclass(frozen=True)
class CreateWorkers:
    """The worker ServiceAccount, Role and RoleBinding (again for each worker Job: someone may
    have deleted them), then the worker Job with `parallelism` pods."""

    parallelism: int
    items_at_start: int  # images done when it was made (tells a crash loop from progress)
    spec: ImageBatchJobSpec


@dataclass(frozen=True)
class PatchWorkers:
    patch: JSON  # the worker Job's spec fields
    scaled_down: bool = False  # restart the scale-down cool-down


@dataclass(frozen=True)
class DeleteWorkers:
    why: str


@dataclass(frozen=True)
class PostEvent:
    type: Literal["Normal", "Warning"]
    reason: EventReason
    message: str


@dataclass(frozen=True)
class DeleteJob:
    why: str


Action = (
    CreateShards | WriteShardStatus | CreateWorkers | PatchWorkers | DeleteWorkers | PostEvent | DeleteJob
)


@dataclass
class Plan:
    status: ImageBatchJobStatus  # complete, conditions included: written once, when it changed
    actions: list[Action] = field(default_factory=list)
    reported: set[str] = field(default_factory=set)  # what this plan's Events report, once each
    tally: Tally | None = None  # the counts of a working pass (for the metrics)
    again: bool = False  # observe again at once (shards were just made: the workers come next)
