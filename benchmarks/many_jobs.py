"""Many ImageBatchJobs at once on one operator: do they all finish, and how late. Prints JSON lines.

A local control plane with the test node agent (imagebatch_testing.cluster: worker pods are real
worker processes on the tiny builtin model) runs the real operator (benchmarks/fleetsim.py). First
one job alone on the idle operator, then `--jobs` jobs (default 100) in `--namespaces` namespaces
(default 20), created at once from as many threads. Each has `--shards` shards (default 3) of
`--shard-size` images (default 2) at 32x32, one worker pod requesting `--worker-cpu` (default
500m): the node (2 CPUs here) runs the pods that fit, the rest wait as Pending pods.

Two watches (every job, every shard) stamp when each shard is first seen Done and each job first
seen Complete. Per run it prints, for each job, the time from its last shard Done to its Complete
condition (p50, the slowest and which job), the operator's peak resident memory (/proc VmHWM)
and CPU seconds, and checks every output: manifest.jsonl has one line per image, no duplicates,
and every image is there. A last line gives the slowest of the many against the job alone.

    python benchmarks/many_jobs.py                          # 100 jobs in 20 namespaces
    python benchmarks/many_jobs.py --jobs 4 --namespaces 2  # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleetsim  # benchmarks/ is no package: its folder is on sys.path
from fleetsim import GROUP_PATH, ControlPlane

JSON = dict[str, Any]


class Stamps:
    """When each shard was first seen Done and each job first seen Complete (watch events)."""

    def __init__(self, plane: ControlPlane) -> None:
        from imagebatch.names import LABEL_JOB

        self.label = LABEL_JOB
        self.client = plane.client
        self.lock = threading.Lock()
        self.done: dict[tuple[str, str], dict[str, float]] = {}  # (ns, job) -> {shard: when}
        self.complete: dict[tuple[str, str], float] = {}
        self.stopping = threading.Event()
        for plural, seen in (("imagebatchshards", self._shard), ("imagebatchjobs", self._job)):
            threading.Thread(target=self._watch, args=(plural, seen), daemon=True).start()

    def _shard(self, obj: JSON, now: float) -> None:
        if (obj.get("status") or {}).get("state") != "Done":
            return
        meta = obj["metadata"]
        key = (meta["namespace"], (meta.get("labels") or {}).get(self.label, ""))
        with self.lock:
            self.done.setdefault(key, {}).setdefault(meta["name"], now)

    def _job(self, obj: JSON, now: float) -> None:
        conditions = (obj.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions):
            meta = obj["metadata"]
            with self.lock:
                self.complete.setdefault((meta["namespace"], meta["name"]), now)

    def _watch(self, plural: str, seen: Any) -> None:
        path = f"{GROUP_PATH}/{plural}"
        while not self.stopping.is_set():
            try:
                listing = self.client.get(path)
                now = time.time()
                for obj in listing["items"]:
                    seen(obj, now)
                version = listing["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    for event in self.client.watch(path, resource_version=version, timeout_seconds=60):
                        obj = event["object"]
                        version = obj["metadata"].get("resourceVersion", version)
                        if event["type"] in ("ADDED", "MODIFIED"):
                            seen(obj, time.time())
            except Exception as e:  # a watch that ends or fails lists again
                if not self.stopping.is_set():
                    print(f"{plural} watch: {e}; listing again", file=sys.stderr)
                    time.sleep(0.5)

    def latency(self, key: tuple[str, str], shards: int) -> float | None:
        """Seconds from the job's last shard Done to its Complete; None until both are seen."""
        with self.lock:
            done, complete = self.done.get(key, {}), self.complete.get(key)
        if complete is None or len(done) < shards:
            return None
        return complete - max(done.values())


def job_spec(out: str, args: argparse.Namespace) -> JSON:
    from harness import TINY_ENV

    n = args.shards * args.shard_size
    return {
        "model": {"name": "builtin:tiny"},
        "prompts": [f"a tiny fox, number {i}" for i in range(n)],
        "generation": {"width": 32, "height": 32, "steps": 2},
        "batching": {"batchSize": args.shard_size, "shardSize": args.shard_size},
        "output": {"uri": out},
        "workers": {
            "maxReplicas": 1,
            "gpusPerWorker": 0,
            "env": TINY_ENV,
            "resources": {"requests": {"cpu": args.worker_cpu}},
        },
    }


def run_jobs(
    plane: ControlPlane, stamps: Stamps, keys: list[tuple[str, str]], args: argparse.Namespace
) -> JSON:
    """Creates the jobs at once, waits for every one to be Complete, checks every output."""
    from harness import check_output_dir

    out = plane.dir / "out"
    op_before = plane.operator_usage()
    started = time.time()
    with ThreadPoolExecutor(min(32, len(keys))) as pool:
        list(
            pool.map(
                lambda k: fleetsim.create_job(plane, k[0], job_spec(str(out / k[0] / k[1]), args), k[1]),
                keys,
            )
        )
    peak = 0.0
    deadline = time.monotonic() + args.timeout
    while True:
        peak = max(peak, plane.operator_usage()["rss_mb"])
        latencies = {k: stamps.latency(k, args.shards) for k in keys}
        if all(v is not None for v in latencies.values()):
            break
        if time.monotonic() > deadline:
            left = [f"{ns}/{name}" for (ns, name), v in latencies.items() if v is None]
            raise SystemExit(f"{len(left)} jobs not Complete after {args.timeout:.0f}s: {left[:10]}")
        time.sleep(1)
    seconds = time.time() - started
    op_after = plane.operator_usage()
    for ns, name in keys:
        check_output_dir(out / ns / name, args.shards * args.shard_size)
    values = {k: float(v) for k, v in latencies.items() if v is not None}
    slowest = max(values, key=lambda k: values[k])
    return {
        "jobs": len(keys),
        "namespaces": len({ns for ns, _ in keys}),
        "shards_per_job": args.shards,
        "images_per_job": args.shards * args.shard_size,
        "all_complete": True,
        "outputs_exact": True,  # check_output_dir raised otherwise
        "seconds": round(seconds, 1),
        "done_to_complete_p50_s": round(statistics.median(values.values()), 3),
        "done_to_complete_max_s": round(values[slowest], 3),
        "slowest_job": f"{slowest[0]}/{slowest[1]}",
        "operator_cpu_s": round(op_after["cpu_s"] - op_before["cpu_s"], 2),
        "operator_rss_mb": round(peak, 1),
        "operator_max_rss_mb": round(op_after["max_rss_mb"], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--namespaces", type=int, default=20)
    parser.add_argument("--shards", type=int, default=3, help="shards per job")
    parser.add_argument("--shard-size", type=int, default=2, help="images per shard")
    parser.add_argument("--worker-cpu", default="500m", help="the CPU each worker pod requests")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for every job to finish")
    parser.add_argument("--dir", help="state dir of the control plane (default: a temporary one)")
    args = parser.parse_args()

    with fleetsim.control_plane(args.dir, None, node_agent=True) as plane:
        stamps = Stamps(plane)
        alone = run_jobs(plane, stamps, [(plane.new_namespace("alone"), "alone")], args)
        print(
            json.dumps({"benchmark": "many_jobs", "run": "alone", **alone, **fleetsim.machine()}), flush=True
        )
        namespaces = [plane.new_namespace(f"many-{i:02d}") for i in range(args.namespaces)]
        keys = [(namespaces[i % args.namespaces], f"job-{i:03d}") for i in range(args.jobs)]
        many = run_jobs(plane, stamps, keys, args)
        print(json.dumps({"benchmark": "many_jobs", "run": "many", **many, **fleetsim.machine()}), flush=True)
        stamps.stopping.set()
    ratio = many["done_to_complete_max_s"] / alone["done_to_complete_max_s"]
    print(
        json.dumps(
            {
                "benchmark": "many_jobs",
                "ratio": f"slowest of {args.jobs} / alone",
                "done_to_complete": round(ratio, 2),
                "targets": {
                    "all_complete_exact": many["all_complete"] and many["outputs_exact"],
                    "operator_max_rss_under_200mb": many["operator_max_rss_mb"] < 200,
                    "slowest_within_3x_of_alone": ratio <= 3,
                },
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
