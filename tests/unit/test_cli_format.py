"""What the cluster CLI prints from a job's status: the progress line and the status table."""

from __future__ import annotations

import io
from typing import Any

from imagebatch.cli import ProgressLine, status_rows
from imagebatch.client import Progress, job_state


def job(done: int, total: int, *conds: tuple[str, str, str], **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "cats", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {
            "items": {"done": done, "total": total, "failed": 0},
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": "x"}
                for t, r, m in conds
            ],
            "activeReplicas": 2,
            "desiredReplicas": 3,
            **status,
        },
    }


def test_progress_line_when_not_a_terminal() -> None:
    out = io.StringIO()
    ProgressLine(out)(Progress.of(job(25, 100, imagesPerSecond="3.5", eta="21s")))
    assert out.getvalue() == (
        "cats [#######-----------------------] 25/100 images (25%) | 3.5 img/s | ETA 21s | 2/3 workers | Running\n"
    )


def test_states_come_from_the_conditions() -> None:
    assert job_state(job(0, 0)) == ("Pending", "", "")
    assert job_state(job(1, 2)) == ("Running", "", "")
    assert job_state(job(2, 2, ("Complete", "Completed", ""))) == ("Complete", "Completed", "")
    failed = job(1, 2, ("Complete", "Completed", ""), ("Failed", "ModelLoadError", "no model"))
    assert job_state(failed) == ("Failed", "ModelLoadError", "no model")  # Failed wins
    not_true = job(1, 2)
    not_true["status"]["conditions"] = [{"type": "Complete", "status": "False", "reason": "Running"}]
    assert job_state(not_true)[0] == "Running"


def test_status_table() -> None:
    rows = status_rows([job(2, 2, ("Complete", "Completed", "")), job(1, 4, ("Failed", "ShardsFailed", "x"))])
    assert rows[0] == ["NAME", "STATE", "PROGRESS", "IMG/S", "ETA", "WORKERS", "AGE"]
    assert rows[1][:3] == ["cats", "Complete", "2/2"] and rows[2][:3] == [
        "cats",
        "Failed (ShardsFailed)",
        "1/4",
    ]
    assert rows[1][6].endswith("d")  # created long ago
