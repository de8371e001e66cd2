"""A deleted job's metric series go with it, on its DELETED watch event (operator/handlers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Kubectl, Operator, ibj, tiny_job, wait_for

pytestmark = pytest.mark.cluster


def test_a_deleted_jobs_series_go_with_it(
    kubectl: Kubectl, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    # Suspended: the operator plans and reports it, no worker runs.
    kubectl.apply([tiny_job("gone", str(tmp_path / "out"), prompts=["a cat"], suspend=True)], namespace)
    kubectl.apply([tiny_job("kept", str(tmp_path / "out2"), prompts=["a dog"], suspend=True)], namespace)

    def series(job: str) -> set[str]:
        labels = (f'namespace="{namespace}"', f'job="{job}"')
        return {
            line.split("{", 1)[0]
            for line in running_operator.metrics().splitlines()
            if not line.startswith("#") and all(x in line for x in labels)
        }

    # A status written: the operator is up, its metrics endpoint too (served before kopf starts).
    for job in ("gone", "kept"):
        wait_for(
            f"a status of {job}",
            lambda j=job: "progress" in (ibj(kubectl, namespace, j).get("status") or {}),
            timeout=120,
        )
    running_operator.wait_passes(namespace, "gone")
    running_operator.wait_passes(namespace, "kept")
    assert {
        "imagebatch_job_items",
        "imagebatch_job_images_per_second",
        "imagebatch_job_desired_replicas",
        "imagebatch_job_reconciles_total",
    } <= series("gone")

    kubectl("delete", "ibj", "gone", "-n", namespace)
    wait_for("the deleted job's series to go", lambda: not series("gone"), timeout=120, interval=0.2)
    # The watch event did it (the resync would too, a tick later, without this line).
    wait_for(
        "the operator to log the deletion",
        lambda: f"{namespace}/gone deleted: its metric series are removed" in running_operator.log(),
        timeout=60,
    )
    assert "imagebatch_job_items" in series("kept")
