"""benchmarks/fleet.py and benchmarks/claims.py end to end at a tiny size, on one control plane.

Both run their simulated workers as pods of the real operator's worker Job (benchmarks/
fleetsim.py); this checks that they run, that every field is there and that the figures hang
together (a fleet cannot make images faster than its fake engine, the API server sees at least
the writes the workers count). It asserts no cost target: that is benchmarks/results/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagebatch_testing.cluster import LocalCluster, build_binaries

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
JSON = dict[str, Any]


@pytest.fixture(scope="module")
def bench_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A control plane of the benchmarks' own (no node agent: their fake node is the only one)."""
    cluster = LocalCluster(
        tmp_path_factory.mktemp("fleet-cluster"), bin_dir=build_binaries(), node_agent=False
    )
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


def run_bench(script: str, cluster: LocalCluster, state: Path, *args: str) -> list[JSON]:
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / script),
            *args,
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_fleet_benchmark_smoke(bench_cluster: LocalCluster, tmp_path: Path) -> None:
    image_ms = 10.0
    lines = run_bench(
        "fleet.py",
        bench_cluster,
        tmp_path,
        *("--workers", "2", "4", "--seconds", "5", "--shard-seconds", "2"),
        *("--image-ms", str(image_ms), "--fake-batch", "5", "--processes", "2"),
    )
    rows, ratio = lines[:-1], lines[-1]
    assert [r["workers"] for r in rows] == [2, 4]
    for r in rows:
        n = r["workers"]
        assert r["claims"] >= n, r  # every worker claimed at least its first shard
        # No faster than the fake engine; not far slower either (2 s shards, 5 s measured).
        assert 0.2 * 1000 / image_ms < r["images_per_worker_per_s"] <= 1.05 * 1000 / image_ms, r
        assert r["saturated"] == (r["engine_rate_fraction"] < 0.8), r
        assert 0 <= r["claim_p50_s"] <= r["claim_p99_s"] <= r["claim_max_s"] < 5, r
        assert r["apiserver_bytes_per_worker_per_s"] > 0 and r["client_bytes_per_worker_per_s"] > 0, r
        kinds = r["writes_by_kind_per_worker_per_min"]
        assert kinds["claim"] > 0 and kinds["end"] > 0, r  # shards were claimed and finished
        assert r["writes_per_worker_per_min"] >= kinds["claim"] + kinds["end"], r
        # The API server saw the workers' writes (the operator's too), in a window a little off.
        assert r["apiserver_writes_per_worker_per_min"] >= 0.5 * r["writes_per_worker_per_min"], r
        assert 20 < r["operator_max_rss_mb"] < 2000 and r["operator_cpu_s"] >= 0, r
    assert ratio["ratio"] == "4/2 workers"
    assert ratio["apiserver_bytes_per_worker_per_s"] > 0 and ratio["claim_p99"] is not None
    assert ratio["saturated"] == [r["workers"] for r in rows if r["saturated"]]
    assert set(ratio["targets"]) == {
        "bytes_per_worker_within_1.5x",
        "renewal_writes_per_worker_per_min_at_most_6",
        "writes_per_worker_per_min_at_most_6",
        "operator_max_rss_under_200mb",
    }
    print(f"fleet smoke: {json.dumps(ratio)}")


def test_claims_benchmark_smoke(bench_cluster: LocalCluster, tmp_path: Path) -> None:
    lines = run_bench(
        "claims.py", bench_cluster, tmp_path, "--sizes", "20", "--claimers", "2", "4", "--processes", "2"
    )
    rows, ratio = lines[:-1], lines[-1]
    assert [(r["shards"], r["claimers"]) for r in rows] == [(20, 2), (20, 4)]
    for r in rows:
        # The benchmark itself exits non-zero unless every shard was claimed once and Done.
        assert r["claims"] == 20 and r["claims_per_s"] > 0, r
        assert 0 <= r["claim_p50_s"] <= r["claim_p99_s"] <= r["claim_max_s"], r
        assert r["apiserver_bytes_per_claim"] > 0 and r["client_bytes_per_claim"] > 0, r
        assert r["apiserver_writes_per_claim"] >= 1, r  # at least the claim itself
    assert ratio["ratio"] == "4/2 claimers, 20 shards" and ratio["apiserver_bytes_per_claim"] > 0
    print(f"claims smoke: {json.dumps(ratio)}")
