"""Planning a prompt-file job on the local control plane: time to the planned status, operator RSS.

A 1,000,000-prompt file (3,907 shards at the default shardSize 256) and, side by side in the same
run, a 100,000-prompt baseline (391 shards): the first worker streams the file and creates the
shards, the operator sees them and writes `status.shards.total` and `status.items.total`. Prints
one JSON line per size and a ratio line (seconds per shard, 1M against 100k: 1.0 is linear).
The operator's peak RSS (VmHWM) is read from /proc after each size.

    python benchmarks/plan_cluster.py                  # both sizes, a few minutes on 2 cores
    python benchmarks/plan_cluster.py --sizes 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from imagebatch_testing.binaries import build_binaries
from imagebatch_testing.cluster import LocalCluster, free_port
from imagebatch_testing.kubectl import Kubectl, install_crds
from imagebatch_testing.readiness import create_namespace

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def job(name: str, prompts: Path, out: Path) -> dict[str, Any]:
    return {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatchJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "builtin:tiny"},
            "promptsFrom": {"uri": str(prompts)},
            "generation": {"width": 32, "height": 32, "steps": 1},
            "output": {"uri": str(out)},
            # One worker plans; suspending right after planning stops it making images.
            "workers": {
                "maxReplicas": 1,
                "gpusPerWorker": 0,
                "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            },
        },
    }


def measure(k: Kubectl, ns: str, rows: int, work: Path) -> dict[str, Any]:
    prompts = work / f"prompts-{rows}.txt"
    with prompts.open("w") as f:
        for i in range(rows):
            f.write(f"a product photograph of item {i}, studio light, catalogue number {i}\n")
    name = f"plan-{rows}"
    t0 = time.monotonic()
    k.apply([job(name, prompts, work / f"out-{rows}")], ns)
    shards = items = 0
    while True:
        status = k.json("get", "ibj", name, "-n", ns).get("status") or {}
        shards = int((status.get("shards") or {}).get("total", 0))
        items = int((status.get("items") or {}).get("total", 0))
        if items == rows and shards == -(-rows // 256):
            break
        failed = [
            c for c in status.get("conditions") or [] if c["type"] == "Failed" and c["status"] == "True"
        ]
        if failed:
            raise SystemExit(f"{name} failed: {failed}")
        if time.monotonic() - t0 > 1800:
            raise SystemExit(f"{name}: not planned in 1800 s: {status}")
        time.sleep(0.2)
    seconds = time.monotonic() - t0
    k("patch", "ibj", name, "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    k("delete", "ibj", name, "-n", ns, "--wait=false")
    return {"rows": rows, "shards": shards, "items_total": items, "plan_seconds": round(seconds, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="plan-cluster-") as tmp:
        work = Path(tmp)
        bins = build_binaries()
        cluster = LocalCluster(work / "cluster", bin_dir=bins)
        cluster.up()
        operator = None
        try:
            k = Kubectl(bins / "kubectl", cluster.kubeconfig, work / "kubectl-cache")
            install_crds(k, REPO / "crds")
            ns = "bench"
            create_namespace(cluster.client(), ns)
            log = (work / "operator.log").open("wb")
            operator = subprocess.Popen(
                [
                    sys.executable,
                    "-P",
                    "-m",
                    "imagebatch.operator",
                    "--all-namespaces",
                    "--interval=1",
                    f"--metrics-port={free_port()}",
                    "--worker-metrics-port=0",
                    # The test node cannot mount volumes: the bench's prompt files are local.
                    "--worker-local-paths=any",
                ],
                cwd=work,
                env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            results = []
            for rows in args.sizes:
                r = measure(k, ns, rows, work)
                r |= {
                    "bench": "plan_cluster",
                    "operator_peak_rss_mib": round(peak_rss_mib(operator.pid), 1),
                    "seconds_per_1000_shards": round(1000 * r["plan_seconds"] / r["shards"], 2),
                    "python": platform.python_version(),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                }
                results.append(r)
                print(json.dumps(r), flush=True)
            if len(results) == 2:
                a, b = results
                print(
                    json.dumps(
                        {
                            "bench": "plan_cluster_ratio",
                            "rows": [a["rows"], b["rows"]],
                            "seconds_per_shard_ratio": round(
                                b["seconds_per_1000_shards"] / a["seconds_per_1000_shards"], 2
                            ),
                            "operator_peak_rss_mib": b["operator_peak_rss_mib"],
                        }
                    ),
                    flush=True,
                )
        finally:
            if operator is not None:
                operator.terminate()
                operator.wait(timeout=60)
            cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
