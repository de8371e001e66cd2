"""Claim holders: a worker pod's name, or `<pod>/<rank>` for one engine process of a multi-GPU pod.

Pod names cannot hold a slash, so the pod of a holder is the part before it.
"""

from __future__ import annotations


def rank_holder(pod: str, rank: int) -> str:
    return f"{pod}/{rank}"


def holder_pod(holder: str) -> str:
    return holder.split("/", 1)[0]
