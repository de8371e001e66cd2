"""The claim protocol against a real control plane, at two shard counts. Prints JSON lines.

A local control plane (imagebatch_testing.cluster: etcd, kube-apiserver, no node agent) holds one
ImageBatchJob per size with its shards. 64 claimers in 8 processes (8 threads each; every claimer
has its own API client, shard cache and watch, as a worker pod has) run the worker's own code
path until every shard is Done: `Worker.start_cache()` (one list, then a watch),
`Worker.next_claim()` (a claim from the cache, fenced by resourceVersion) and
`Worker.fenced_write(done)` (a GET and a conditional replace). No images are made.

Per size it prints claims/s, the claim latency (p50, p99: the time `next_claim` took to return a
claim), the bytes of API responses the claimers read per claim (counted in the client: bodies and
watch streams) and the bytes the API server says it sent for imagebatchshards per claim (its
/metrics: `apiserver_response_sizes` for requests, `apiserver_watch_events_sizes` for watch
events, before and after). A last line gives the ratios of the larger size to the smaller.

    python benchmarks/claims.py                 # 400 and 4,000 shards
    python benchmarks/claims.py --sizes 40 400  # a quicker look
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
JSON = dict[str, Any]
GROUP_PATH = "/apis/imagebatch.dev/v1alpha1"


# -- one claimer (in a child process) ---------------------------------------------------------------


def _claimer(kubeconfig: str, ns: str, job: str, pod: str, barrier: Any, out: Any) -> None:
    import kubernetes

    from imagebatch import shardstate
    from imagebatch.kubeclient import TimeoutApiClient
    from imagebatch.timeutil import now_utc
    from imagebatch.worker.cluster import Worker
    from imagebatch.worker.kube import WorkerKube

    class CountingKube(WorkerKube):
        """The worker's own API door, counting the writes that lost a race."""

        conflicts = 0

        def replace_shard_status(self, shard: JSON, status: JSON) -> JSON | None:
            written = super().replace_shard_status(shard, status)
            if written is None:
                self.conflicts += 1
            return written

    conf = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=conf)
    conf.retries = False  # as the worker's own client (worker/kube.py)
    kube = CountingKube(ns, job, api=TimeoutApiClient(conf))
    # The bench's job writes to a local folder outside any volume (no pods here).
    os.environ["IMAGEBATCH_ACCESS_POLICY"] = '{"localPaths":"any"}'
    worker = Worker(kube, pod, threading.Event())
    cache = worker.start_cache()
    barrier.wait()
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
    out.put(
        {
            "pod": pod,
            "latencies": latencies,
            "done": done,
            "bytes": kube.bytes_read,
            "conflicts": kube.conflicts,
            "lists": cache.lists,
            "events": cache.events,
        }
    )


def _process(kubeconfig: str, ns: str, job: str, pods: list[str], barrier: Any, out: Any) -> None:
    threads = [
        threading.Thread(target=_claimer, args=(kubeconfig, ns, job, pod, barrier, out)) for pod in pods
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- the control plane side (the parent) ------------------------------------------------------------


def _metric_sums(text: str) -> dict[str, float]:
    """imagebatchshards' response bytes and counts, and ImageBatchShard watch event bytes."""
    sums = {"response_bytes": 0.0, "responses": 0.0, "watch_event_bytes": 0.0, "watch_events": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith("apiserver_response_sizes_") and 'resource="imagebatchshards"' in name:
            if name.startswith("apiserver_response_sizes_sum{"):
                sums["response_bytes"] += float(value)
            elif name.startswith("apiserver_response_sizes_count{"):
                sums["responses"] += float(value)
        elif name.startswith("apiserver_watch_events_sizes_") and (
            'kind="ImageBatchShard"' in name or 'resource="imagebatchshards"' in name
        ):
            if name.startswith("apiserver_watch_events_sizes_sum{"):
                sums["watch_event_bytes"] += float(value)
            elif name.startswith("apiserver_watch_events_sizes_count{"):
                sums["watch_events"] += float(value)
    return sums


def _metrics(client: Any) -> dict[str, float]:
    status, text = client.get_raw("/metrics", timeout=120)
    if status != 200:
        raise SystemExit(f"cannot read the API server's /metrics: HTTP {status}")
    return _metric_sums(text)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _setup(client: Any, n_shards: int) -> tuple[str, str]:
    """A namespace with one job of `n_shards` shards (one item each); returns (namespace, job)."""
    from imagebatch.shardplan import shard_manifests
    from imagebatch_testing.cluster import create_namespace

    ns, name = f"claims-{n_shards}-{uuid.uuid4().hex[:5]}", "bench"
    create_namespace(client, ns)
    job = client.create(
        f"{GROUP_PATH}/namespaces/{ns}/imagebatchjobs",
        {
            "apiVersion": "imagebatch.dev/v1alpha1",
            "kind": "ImageBatchJob",
            "metadata": {"name": name},
            "spec": {
                "model": {"name": "builtin:tiny"},
                "prompts": ["a claim benchmark"],
                "batching": {"shardSize": 1},
                "output": {"uri": f"{tempfile.gettempdir()}/imagebatch-claims-bench"},
            },
        },
    )
    manifests = shard_manifests(job, n_shards, 1)
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(lambda m: client.create(f"{GROUP_PATH}/namespaces/{ns}/imagebatchshards", m), manifests)
        )
    return ns, name


def run_size(client: Any, kubeconfig: str, n_shards: int, claimers: int, processes: int) -> JSON:
    ns, job = _setup(client, n_shards)
    t0 = time.perf_counter()
    status, body = client.get_raw(f"{GROUP_PATH}/namespaces/{ns}/imagebatchshards", timeout=300)
    one_list = (time.perf_counter() - t0, len(body.encode()))
    assert status == 200, body[:500]

    before = _metrics(client)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(claimers + 1), ctx.Queue()
    pods = [f"claimer-{i:02d}" for i in range(claimers)]
    per = claimers // processes
    procs = [
        ctx.Process(target=_process, args=(kubeconfig, ns, job, pods[i * per : (i + 1) * per], barrier, out))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=1800)  # every cache listed and watching: the claims start
    started = time.perf_counter()
    results = [out.get(timeout=3600) for _ in pods]
    seconds = time.perf_counter() - started
    for p in procs:
        p.join(120)
    after = _metrics(client)

    shards = client.get(f"{GROUP_PATH}/namespaces/{ns}/imagebatchshards")["items"]
    states = [(s.get("status") or {}).get("state") for s in shards]
    claims = [lat for r in results for lat in r["latencies"]]
    done = sum(r["done"] for r in results)
    if done != n_shards or states.count("Done") != n_shards or len(claims) != n_shards:
        raise SystemExit(
            f"{n_shards} shards: {done} marked Done by claimers, {len(claims)} claims, states {set(states)}"
        )
    delta = {k: after[k] - before[k] for k in after}
    client.delete(f"/api/v1/namespaces/{ns}")
    return {
        "shards": n_shards,
        "claimers": claimers,
        "processes": processes,
        "claims": len(claims),
        "seconds": round(seconds, 2),
        "claims_per_s": round(len(claims) / seconds, 1),
        "claim_p50_s": round(statistics.median(claims), 4),
        "claim_p99_s": round(_percentile(claims, 0.99), 4),
        "claim_max_s": round(max(claims), 4),
        "conflicts": sum(r["conflicts"] for r in results),
        "client_bytes_per_claim": round(sum(r["bytes"] for r in results) / len(claims)),
        "apiserver_response_bytes_per_claim": round(delta["response_bytes"] / len(claims)),
        "apiserver_responses_per_claim": round(delta["responses"] / len(claims), 2),
        "apiserver_watch_event_bytes_per_claim": round(delta["watch_event_bytes"] / len(claims)),
        "apiserver_bytes_per_claim": round(
            (delta["response_bytes"] + delta["watch_event_bytes"]) / len(claims)
        ),
        "lists_per_claimer": round(sum(r["lists"] for r in results) / claimers, 2),
        "watch_events_per_claimer": round(sum(r["events"] for r in results) / claimers),
        "one_list_s": round(one_list[0], 3),
        "one_list_bytes": one_list[1],
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 4000])
    parser.add_argument("--claimers", type=int, default=64)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--dir", help="state dir of the control plane (default: a temporary one)")
    args = parser.parse_args()
    if args.claimers % args.processes:
        parser.error("--claimers must be a multiple of --processes")

    from imagebatch_testing.cluster import LocalCluster, build_binaries
    from imagebatch_testing.kubectl import Kubectl, install_crds

    state = Path(args.dir or tempfile.mkdtemp(prefix="claims-bench-"))
    cluster = LocalCluster(state, bin_dir=build_binaries(), node_agent=False)
    cluster.up()
    try:
        kubectl = Kubectl(cluster.bin_dir / "kubectl", cluster.kubeconfig, state / "kubectl-cache")  # type: ignore[operator]
        install_crds(kubectl, REPO / "crds")
        client = cluster.client()
        lines = []
        for n in args.sizes:
            line = {
                "benchmark": "claims",
                **run_size(client, str(cluster.kubeconfig), n, args.claimers, args.processes),
            }
            line.update(machine=platform.machine(), cpus=os.cpu_count(), python=platform.python_version())
            print(json.dumps(line), flush=True)
            lines.append(line)
        if len(lines) >= 2:
            small, big = lines[0], lines[-1]
            print(
                json.dumps(
                    {
                        "benchmark": "claims",
                        "ratio": f"{big['shards']}/{small['shards']}",
                        "claim_p99": round(big["claim_p99_s"] / small["claim_p99_s"], 2),
                        "claim_p50": round(big["claim_p50_s"] / small["claim_p50_s"], 2),
                        "client_bytes_per_claim": round(
                            big["client_bytes_per_claim"] / small["client_bytes_per_claim"], 2
                        ),
                        "apiserver_bytes_per_claim": round(
                            big["apiserver_bytes_per_claim"] / small["apiserver_bytes_per_claim"], 2
                        ),
                    }
                ),
                flush=True,
            )
    finally:
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
