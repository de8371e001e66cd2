"""`python -m imagebatch.operator`: run the operator (kopf, standalone: one replica, no peering)."""

from __future__ import annotations

import argparse
import logging
import sys

import kopf

from imagebatch.access import AccessPolicy
from imagebatch.operator import metrics
from imagebatch.operator.builders import DEFAULT_WORKER_IMAGE, WorkerSettings
from imagebatch.operator.handlers import register
from imagebatch.operator.kube import OperatorKube
from imagebatch.operator.reconcile import Reconciler, Settings
from imagebatch.operator.resync import Resync


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m imagebatch.operator", description=__doc__)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between reconcile passes of a job")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port; 0: none")
    p.add_argument(
        "--liveness", default=None, help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz"
    )
    p.add_argument("--worker-image", default=DEFAULT_WORKER_IMAGE, help="worker image when a job names none")
    p.add_argument("--worker-metrics-port", type=int, default=9090, help="workers' metrics port; 0: none")
    p.add_argument("--scale-down-cool-down", type=float, default=30.0, help="seconds between scale-downs")
    # What the workers of any job may reach (the chart's worker.access); a job cannot widen it.
    p.add_argument(
        "--worker-local-paths",
        choices=("volumes", "any"),
        default="volumes",
        help="volumes: local prompt and output paths only inside the job's own volumeMounts; any: anywhere",
    )
    p.add_argument(
        "--worker-uri-schemes",
        type=_names,
        default=["s3"],
        help="comma-separated URI schemes workers may open besides local paths (default s3; '' none)",
    )
    p.add_argument(
        "--worker-http-hosts",
        type=_names,
        default=[],
        help="comma-separated hosts an http(s) prompt URI may name (needs http/https in the schemes)",
    )
    p.add_argument(
        "--worker-s3-endpoints",
        type=_names,
        default=[],
        help="comma-separated S3 endpoint URLs a job may use besides AWS's ('*': any)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kopf logs every handler call at INFO; keep ours readable.
    logging.getLogger("kopf").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        access = AccessPolicy.from_settings(
            args.worker_local_paths, args.worker_uri_schemes, args.worker_http_hosts, args.worker_s3_endpoints
        )
    except ValueError as e:
        build_parser().error(str(e))
    settings = Settings(
        worker=WorkerSettings(image=args.worker_image, metrics_port=args.worker_metrics_port, access=access),
        cool_down=args.scale_down_cool_down,
    )
    registry = kopf.OperatorRegistry()
    kube = OperatorKube()
    kube.start_informers(args.namespace)
    reconciler = Reconciler(kube, settings)
    resync = Resync(reconciler, kube, args.namespace, args.interval)
    if kube.shard_informer is not None:
        kube.shard_informer.on_change = resync.poke  # a shard changed state: its job's pass now
    register(reconciler, resync, registry)
    metrics.serve(args.metrics_port)
    kopf.run(
        registry=registry,
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
