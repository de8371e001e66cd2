"""benchmarks/many_jobs.py end to end at a tiny size: a few jobs in two namespaces, real workers.

Checks that it runs, that every job is Complete with exact outputs (the benchmark checks each
output dir and exits non-zero otherwise) and that the figures are there and sane. It asserts no
latency target: that is benchmarks/results/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


def test_many_jobs_benchmark_smoke(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "many_jobs.py"),
            *("--jobs", "3", "--namespaces", "2", "--shards", "2", "--shard-size", "1"),
            *("--worker-cpu", "1", "--timeout", "300", "--dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    alone, many, ratio = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert (alone["run"], alone["jobs"], many["run"], many["jobs"], many["namespaces"]) == (
        "alone",
        1,
        "many",
        3,
        2,
    )
    for run in (alone, many):
        assert run["all_complete"] and run["outputs_exact"] and run["images_per_job"] == 2, run
        # Complete comes after the last shard's Done (the join, then an operator pass), not long after.
        assert 0 <= run["done_to_complete_p50_s"] <= run["done_to_complete_max_s"] < 120, run
        assert 20 < run["operator_max_rss_mb"] < 2000 and run["operator_cpu_s"] > 0, run
    assert many["slowest_job"].split("/")[1] in {"job-000", "job-001", "job-002"}
    assert ratio["done_to_complete"] >= 0 and set(ratio["targets"]) == {
        "all_complete_exact",
        "operator_max_rss_under_200mb",
        "slowest_within_3x_of_alone",
    }
    print(f"many_jobs smoke: {json.dumps(ratio)}")
