"""Acceptance (2) and (3): 10,000 prompts from a ~2 MB file (not inline) on several workers make
exactly 10,000 images and manifest lines; with a backlog, the worker Job's parallelism rises to
maxReplicas (4) and falls to 0 at the end."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import (
    Kubectl,
    Operator,
    check_output_dir,
    ibj,
    scaling_history,
    tiny_job,
    wait_condition,
    wait_for,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

N = 10_000


def prompt_file(path: Path) -> Path:
    """10,000 distinct prompts, about 2 MB."""
    colours = ["red", "blue", "green", "amber", "violet", "teal", "ochre", "silver"]
    things = ["bicycle", "teapot", "lighthouse", "armchair", "violin", "sailboat", "cactus", "lantern"]
    with path.open("w") as f:
        for i in range(N):
            f.write(
                f"product {i:05d}: a {colours[i % 8]} {things[(i // 8) % 8]} on a plain background, studio "
                f"photograph, soft light, high detail, catalogue shot number {i} of the spring collection, "
                "centered, sharp focus\n"
            )
    return path


def test_ten_thousand_prompts_from_a_file(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    prompts = prompt_file(tmp_path / "prompts.txt")
    assert 1_500_000 < prompts.stat().st_size < 2_500_000
    out = tmp_path / "out"
    job = tiny_job(
        "ten-k",
        str(out),
        promptsFrom={"uri": str(prompts)},
        batching={"batchSize": 32, "shardSize": 250},
        workers={"maxReplicas": 4, "shardsPerReplica": 2},
    )
    t0 = time.monotonic()
    kubectl.apply([job], namespace)
    wait_condition(kubectl, namespace, "ten-k", "Complete", timeout=1800)
    elapsed = time.monotonic() - t0
    # The worker counts the operator set, from its Events (a record, not a sample of the Job).
    history = scaling_history(kubectl, namespace, "ten-k")
    print(f"\n10,000 images in {elapsed:.0f}s; worker Job parallelism set to {history}")

    status = ibj(kubectl, namespace, "ten-k")["status"]
    assert status["items"] == {"total": N, "done": N, "failed": 0}
    assert status["shards"]["total"] == status["shards"]["done"] == 40
    lines = check_output_dir(out, {f"p{i:07d}" for i in range(N)})
    assert lines[123]["prompt"].startswith("product 00123:")
    # The backlog brought 4 workers (never more), and the end brings none: parallelism 0, or a
    # worker Job that completed (its workers all exited).
    assert max(history) == 4, history

    def no_workers_wanted() -> bool:
        wj = kubectl.json("get", "job", "ten-k-workers", "-n", namespace)
        done = any(
            c["type"] == "Complete" and c["status"] == "True" for c in wj["status"].get("conditions") or []
        )
        return done or wj["spec"].get("parallelism") == 0

    wait_for("the worker Job scaled to 0 or complete", no_workers_wanted, timeout=300)
