"""Numbers a user can believe (issue 23): during a job whose shards take several batches, every
status sample after the first stored batch shows IMG/S > 0 and an ETA, and the ETA read at 10%
of the images is within 2x of the time that was really left (the rate is the pace of image
making: the worker's model load, before its first claim, is not in it).

Timing is the point here, so the bound is loose (2x) and the job long enough (many batches
before the 10% mark) for one slow batch on a shared machine not to decide it."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from harness import Kubectl, Operator, steps, tiny_job, wait_for

from imagebatch_testing.pytest_plugin import TestCluster

pytestmark = pytest.mark.cluster


def seconds(eta: str) -> float:
    """`1h02m`, `3m05s`, `42s` (operator/progress.format_duration) in seconds."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", eta)
    assert m and eta, eta
    h, mi, s = (int(x or 0) for x in m.groups())
    return h * 3600 + mi * 60 + s


def test_rate_and_eta_from_the_first_batch_and_eta_at_10_percent(
    kube_cluster: TestCluster, kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    n = 300
    job = tiny_job(
        "eta",
        str(tmp_path / "out"),
        prompts=[f"a lighthouse at dusk, variation {i}" for i in range(n)],
        generation={"steps": 16},
        batching={"batchSize": 4, "shardSize": 60},  # 15 batches a shard
        workers={"maxReplicas": 1},
    )
    kubectl.apply([job], namespace)
    path = f"/apis/imagebatch.dev/v1alpha1/namespaces/{namespace}/imagebatchjobs/eta"
    seen: list[tuple[float, int, float, str]] = []  # (time, done, images/s, eta)

    def all_made() -> bool:
        status = kube_cluster.client.get(path).get("status") or {}
        done = int((status.get("items") or {}).get("done", 0))
        seen.append(
            (time.monotonic(), done, float(status.get("imagesPerSecond") or 0), status.get("eta") or "")
        )
        return done >= n

    wait_for("every image of the job", all_made, timeout=900, interval=0.2)
    end = seen[-1][0]
    making = [s for s in seen if 0 < s[1] < n]
    assert len(making) >= 5, seen  # the job was sampled while it ran
    bad = [s for s in making if not (s[2] > 0 and s[3])]
    assert not bad, bad  # from the first stored batch on, a rate and an ETA
    at_10 = next(s for s in making if s[1] >= n // 10)
    left = end - at_10[0]
    eta = seconds(at_10[3])
    assert left / 2 <= eta <= left * 2, (at_10, f"{left:.1f}s really left", steps(16))
