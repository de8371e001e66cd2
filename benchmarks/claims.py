"""The claim protocol against a real control plane: shard counts by claimer counts. Prints JSON lines.

A local control plane (imagebatch_testing.cluster, no node agent) runs the real operator; per row
(a shard count, a claimer count) one ImageBatchJob of that many one-item shards, planned by the
operator, whose worker Job's pods are the claimers: benchmarks/fleetsim.py's fake node marks them
Running as the Job controller makes them and the scheduler binds them, and each pod's name is a
claimer, run as a thread (8 processes, many threads each; every claimer has its own API client,
shard view and watch, as a worker pod has). Each runs the worker's own code path until no shard
is left: `Worker.start_cache()`, then (once every claimer is ready) `Worker.next_claim()` (a claim,
fenced by resourceVersion) and `Worker.fenced_write(done)` (a GET and a conditional replace). No
images are made.

Per row it prints claims/s, the claim latency (p50, p99: the time `next_claim` took to return a
claim), the bytes of API responses the claimers read per claim (counted in the client: bodies and
watch streams) and the bytes the API server says it sent for imagebatchshards per claim (its
/metrics: `apiserver_response_sizes` for requests, `apiserver_watch_events_sizes` for watch
events, before and after; the operator's share included). Last lines give the ratios of each
claimer count to the smallest (per shard count), and of the larger shard count to the smaller.

    python benchmarks/claims.py                                # 400 and 4,000 shards, 64 claimers
    python benchmarks/claims.py --sizes 400 --claimers 16 64 256
    python benchmarks/claims.py --sizes 40 --claimers 4 8      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleetsim  # benchmarks/ is no package: its folder is on sys.path
from fleetsim import GROUP_PATH, ControlPlane, Fleet, Sim

JSON = dict[str, Any]


def claimer(sim: Sim) -> tuple[int, JSON]:
    """One claimer (a thread of a child process): claims and marks Done until nothing is left."""
    from imagebatch import shardstate
    from imagebatch.timeutil import now_utc

    worker, kube = sim.worker()
    cache = worker.start_cache()
    sim.ready()
    sim.go.wait()
    latencies: list[float] = []
    done = 0
    while True:
        t0 = time.perf_counter()
        claim = worker.next_claim()
        if claim is None:
            break
        latencies.append(time.perf_counter() - t0)
        n = claim.end - claim.start
        done += worker.fenced_write(claim, lambda st, n=n: shardstate.done(st, now_utc(), n, 0.0))
    cache.close()
    return 0, {
        "latencies": latencies,
        "done": done,
        "bytes": kube.bytes_read,
        "conflicts": kube.conflicts,
        "bodiless_errors": len(kube.api.bodiless),
        "lists": cache.lists,
        "events": cache.events,
    }


def run_row(plane: ControlPlane, n_shards: int, claimers: int, processes: int) -> JSON:
    client = plane.client
    ns = plane.new_namespace(f"claims-{n_shards}-{claimers}")
    job = fleetsim.create_job(
        plane,
        ns,
        {
            "model": {"name": "builtin:tiny"},
            "prompts": [f"a claim benchmark {i}" for i in range(n_shards)],
            "batching": {"shardSize": 1},
            "output": {"uri": str(plane.dir / "out" / ns)},
            "workers": fleetsim.fleet_workers_spec(claimers),
        },
    )
    fleet = Fleet(plane, ns, "bench", job["metadata"]["uid"], claimer, {}, processes)
    try:
        fleet.wait_ready(claimers)
        t0 = time.perf_counter()
        status, body = client.get_raw(f"{GROUP_PATH}/namespaces/{ns}/imagebatchshards", timeout=300)
        one_list = (time.perf_counter() - t0, len(body.encode()))
        assert status == 200, body[:500]
        before = plane.metrics()
        started = time.perf_counter()
        fleet.start()
        fleet.wait_ended(claimers)
        seconds = time.perf_counter() - started
        after = plane.metrics()
    finally:
        fleet.close()
    results = fleet.outcomes()
    shards = client.get(f"{GROUP_PATH}/namespaces/{ns}/imagebatchshards")["items"]
    states = [(s.get("status") or {}).get("state") for s in shards]
    claims = [lat for r in results for lat in r["latencies"]]
    done = sum(r["done"] for r in results)
    if done != n_shards or states.count("Done") != n_shards or len(claims) != n_shards:
        raise SystemExit(
            f"{n_shards} shards: {done} marked Done by claimers, {len(claims)} claims, states {set(states)}"
        )
    delta = {k: after[k] - before[k] for k in after}
    plane.delete_namespace(ns)
    return {
        "shards": n_shards,
        "claimers": claimers,
        "processes": processes,
        "claims": len(claims),
        "seconds": round(seconds, 2),
        "claims_per_s": round(len(claims) / seconds, 1),
        "claim_p50_s": round(statistics.median(claims), 4),
        "claim_p99_s": round(fleetsim.percentile(claims, 0.99), 4),
        "claim_max_s": round(max(claims), 4),
        "conflicts": sum(r["conflicts"] for r in results),
        # API errors without a response (status 0) that fleetsim made retryable (see there).
        "bodiless_api_errors": sum(r["bodiless_errors"] for r in results),
        "client_bytes_per_claim": round(sum(r["bytes"] for r in results) / len(claims)),
        "apiserver_response_bytes_per_claim": round(delta["response_bytes"] / len(claims)),
        "apiserver_responses_per_claim": round(delta["responses"] / len(claims), 2),
        "apiserver_watch_event_bytes_per_claim": round(delta["watch_event_bytes"] / len(claims)),
        "apiserver_bytes_per_claim": round(
            (delta["response_bytes"] + delta["watch_event_bytes"]) / len(claims)
        ),
        "apiserver_writes_per_claim": round(delta["writes"] / len(claims), 2),
        "lists_per_claimer": round(sum(r["lists"] for r in results) / claimers, 2),
        "watch_events_per_claimer": round(sum(r["events"] for r in results) / claimers),
        "one_list_s": round(one_list[0], 3),
        "one_list_bytes": one_list[1],
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def ratio(big: JSON, small: JSON, what: str) -> JSON:
    keys = ("claim_p99_s", "claim_p50_s", "client_bytes_per_claim", "apiserver_bytes_per_claim")
    return {
        "benchmark": "claims",
        "ratio": what,
        **{k.removesuffix("_s"): round(big[k] / small[k], 2) if small[k] else None for k in keys},
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 4000])
    parser.add_argument("--claimers", type=int, nargs="+", default=[64])
    parser.add_argument("--processes", type=int, default=8)
    fleetsim.add_plane_arguments(parser)
    args = parser.parse_args()

    lines: list[JSON] = []
    with fleetsim.control_plane(args.dir, args.kubeconfig) as plane:
        for n in args.sizes:
            for c in args.claimers:
                line = {"benchmark": "claims", **run_row(plane, n, c, args.processes)}
                line.update(fleetsim.machine())
                print(json.dumps(line), flush=True)
                lines.append(line)
    for n in args.sizes:
        rows = sorted((r for r in lines if r["shards"] == n), key=lambda r: r["claimers"])
        for r in rows[1:]:
            what = f"{r['claimers']}/{rows[0]['claimers']} claimers, {n} shards"
            print(json.dumps(ratio(r, rows[0], what)), flush=True)
    if len(args.sizes) >= 2:
        for c in args.claimers:
            rows = [r for r in lines if r["claimers"] == c]
            what = f"{rows[-1]['shards']}/{rows[0]['shards']} shards, {c} claimers"
            print(json.dumps(ratio(rows[-1], rows[0], what)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
