"""Prometheus metrics of the operator (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

JOBS = Gauge("imagebatch_jobs", "ImageBatchJobs by condition that is True", ["condition"])
ITEMS = Gauge("imagebatch_job_items", "Images of a job by state", ["namespace", "job", "state"])
RATE = Gauge("imagebatch_job_images_per_second", "Recent throughput of a job", ["namespace", "job"])
REPLICAS = Gauge("imagebatch_job_desired_replicas", "Worker pods wanted by a job", ["namespace", "job"])
RETRIES = Counter(
    "imagebatch_shard_retries_total",
    "Claims returned to Pending or failed by the operator",
    ["namespace", "reason"],
)
RECONCILES = Counter("imagebatch_reconciles_total", "Reconcile passes", ["result"])
# Per job: "has the operator looked at my job since X?" (on call, and the tests' way to wait for
# a pass instead of sleeping). Removed with the job.
JOB_PASSES = Counter(
    "imagebatch_job_reconciles_total", "Finished reconcile passes of a job", ["namespace", "job"]
)

_passes: set[tuple[str, str]] = set()


def count_pass(ns: str, name: str) -> None:
    _passes.add((ns, name))
    JOB_PASSES.labels(ns, name).inc()


# The condition of each job seen, so the per-condition gauge counts every job once.
_job_conditions: dict[tuple[str, str], str] = {}


def set_job_condition(ns: str, name: str, condition: str) -> None:
    _job_conditions[(ns, name)] = condition
    _publish()


def retain_jobs(keys: set[tuple[str, str]]) -> None:
    """Forgets jobs that are gone (a deleted job is no longer counted)."""
    for key in set(_job_conditions) - keys:
        del _job_conditions[key]
    for key in _passes - keys:
        _passes.discard(key)
        JOB_PASSES.remove(*key)
    _publish()


def _publish() -> None:
    for cond in ("Complete", "Failed", "Suspended", "Reconciling"):
        JOBS.labels(cond).set(sum(1 for c in _job_conditions.values() if c == cond))


def serve(port: int) -> None:
    if port:
        start_http_server(port)
