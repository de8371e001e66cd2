"""Which shard a worker claims next. Pure.

The transitions a claim goes through (claimed, renewed, done, released, errored, failed) are the
shared state machine, imagebatch/shardstate.py. Every write is fenced twice: by the
resourceVersion it was read at (the API refuses a stale write), and by holder + attempt
(`shardstate.holds`: a worker acts only on a claim that is still its own), so a zombie that lost
its claim to an expired lease cannot mark the shard Done or Pending.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from imagebatch.shardstate import shard_status

JSON = dict[str, Any]


def claim_order(shards: Sequence[JSON], pod: str) -> list[JSON]:
    """Pending shards in the pod's own order of preference."""
    return ranked([s for s in shards if shard_status(s).state == "Pending"], pod)


def ranked(pending: Sequence[JSON], pod: str) -> list[JSON]:
    """Shards ranked by a hash of the pod and the shard's name (rendezvous hashing): every pod
    has its own order, independent of the others' and unchanged as shards are taken, so two
    workers rarely want the same shard at once, even with a view a few events old."""
    return sorted(pending, key=lambda s: rank(pod, s["metadata"]["name"]))


def rank(pod: str, name: str) -> bytes:
    """Where `pod` ranks the shard `name`: lower first."""
    # A real hash: crc32 is linear, so pods whose names differ in one character (pod-3, pod-7)
    # ranked shards almost alike and raced for the same ones.
    return hashlib.blake2b(f"{pod}/{name}".encode(), digest_size=8).digest()
