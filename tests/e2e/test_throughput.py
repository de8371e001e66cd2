"""Acceptance (5): while a big shard is being made, every status sample after the first stored
image shows images/s > 0 and an ETA (the rate comes from the itemsDone workers report, not
only from shards marked Done)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Failpoints, Kubectl, Operator, ibj, tiny_job, wait_for

pytestmark = pytest.mark.cluster


def test_images_per_second_while_one_big_shard_is_made(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    n = 200
    fail = Failpoints(tmp_path / "failpoints")
    # One shard of 200 images on one worker, two images a batch; the worker holds after its 10th
    # image (its progress on the shard's status), so a status sample is taken mid-shard however
    # fast the machine.
    job = tiny_job(
        "big",
        str(tmp_path / "out"),
        prompts=[f"a lighthouse at dusk, variation {i}" for i in range(n)],
        generation={"steps": 8},
        batching={"batchSize": 2, "shardSize": n},
        retries={"leaseSeconds": 10},
        workers={"maxReplicas": 1, "env": fail.env("image-stored@10=hold")},
    )
    kubectl.apply([job], namespace)

    def sample() -> tuple[int, float, str, bool]:
        status = ibj(kubectl, namespace, "big").get("status") or {}
        done = int((status.get("items") or {}).get("done", 0))
        complete = any(
            c["type"] == "Complete" and c["status"] == "True" for c in status.get("conditions") or []
        )
        return done, float(status.get("imagesPerSecond") or 0), status.get("eta") or "", complete

    fail.wait("image-stored")
    running_operator.wait_passes(namespace, "big")  # a whole pass after the 10th image
    done, rate, eta, complete = sample()
    assert 10 <= done < n and not complete
    assert rate > 0 and eta, (done, rate, eta)  # no shard is Done: a completion rate would read 0

    fail.release()
    seen: list[tuple[int, float, str, bool]] = []

    def finished() -> bool:
        seen.append(sample())
        return seen[-1][3]

    wait_for("the job to complete", finished, timeout=600, interval=0.2)
    bad = [s for s in seen if 0 < s[0] < n and not s[3] and not (s[1] > 0 and s[2])]
    assert not bad, bad
