"""The `imagebatch` command (also `kubectl imagebatch`): run a job locally, validate a manifest;
on a cluster submit, wait, watch, inspect and fetch jobs (through imagebatch.client)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from imagebatch.errors import ImageBatchError

# The Job's podFailurePolicy fails the job on these exit codes, in local mode too.
from imagebatch.names import EXIT_MODEL_LOAD_ERROR, EXIT_USER_ERROR
from imagebatch.reasons import State

if TYPE_CHECKING:
    from collections.abc import Callable

    from imagebatch.client import Client, Progress

log = logging.getLogger("imagebatch")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Libraries' progress bars and advice would drown ours.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _cmd_run(args: argparse.Namespace) -> int:
    from imagebatch.jobfile import load_job

    job = load_job(args.job)
    if args.output:
        spec = job.spec.model_copy(update={"output": job.spec.output.model_copy(update={"uri": args.output})})
        job = job.model_copy(update={"spec": spec})
    from imagebatch.worker.local import run_local  # torch is imported only when a job really runs

    summary = run_local(job, device=args.device, batch_size=args.batch_size, progress=not args.no_progress)
    print(
        f"{summary.items} images in {summary.output} ({summary.made} made, {summary.skipped} already there) "
        f"in {summary.seconds:.1f}s; see manifest.jsonl and index.html"
    )
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from imagebatch.jobfile import load_job
    from imagebatch.planning import expand_items
    from imagebatch.prompts import iter_prompts
    from imagebatch.storage import storage_options

    job = load_job(args.job)
    if args.cluster:
        from imagebatch.access import AccessPolicy, check_job

        # As the workers will judge it (the chart's defaults, or IMAGEBATCH_ACCESS_POLICY), as
        # far as this machine can tell: the volumes are the workers', so paths are taken as written.
        check_job(job.spec, AccessPolicy.from_env(), resolve=False)
        if job.spec.prompts_from is not None:
            print(f"{args.job}: valid for a cluster's workers; they read the prompts")
            return 0
    items = expand_items(iter_prompts(job.spec, storage_options(job.spec.output)), job.spec.generation)
    print(f"{args.job}: valid; {len(items)} images")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from imagebatch.worker import termination

    # Every fatal error of a worker process reaches its container's termination message (and
    # `entry` ends the process right after, with its exit code).
    return termination.reporting(lambda: _worker(args))


def _worker(args: argparse.Namespace) -> int:
    missing = [
        flag
        for flag, v in (("--namespace", args.namespace), ("--job", args.job), ("--pod", args.pod))
        if not v
    ]
    if missing:
        raise ImageBatchError(f"worker: set {', '.join(missing)} (or NAMESPACE, JOB_NAME, POD_NAME)")
    # torch is imported only by workers; a pod with several GPUs runs one engine process per GPU.
    from imagebatch.worker import multigpu

    if args.rank is not None:
        return multigpu.run_rank(
            args.namespace, args.job, args.pod, args.rank, device=args.device, metrics_port=args.metrics_port
        )
    return multigpu.run_worker_pod(
        args.namespace, args.job, args.pod, device=args.device, metrics_port=args.metrics_port
    )


def _exit_now(rc: int) -> NoReturn:
    """Ends a worker process at once. A thread that an error left behind (a pool of the engine or
    of a client) would otherwise keep a failed worker alive at interpreter exit, holding its GPU,
    with the Job controller never seeing the exit code: that happened."""
    stuck = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if stuck and rc != 0:
        logging.getLogger("imagebatch.worker").warning("exiting %d; threads left: %s", rc, ", ".join(stuck))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from imagebatch.worker import termination

    # The fetch step is a container of the worker pod: its fatal error is its termination message.
    return termination.reporting(lambda: _fetch_model(args))


def _fetch_model(args: argparse.Namespace) -> int:
    from imagebatch.api import ModelSpec
    from imagebatch.errors import ModelLoadError
    from imagebatch.worker import termination
    from imagebatch.worker.pipeline import fetch_model  # torch is imported only by workers

    spec = ModelSpec(name=args.model, revision=args.revision, variant=args.variant, pipeline=args.pipeline)
    try:
        fetch_model(spec)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        termination.write(str(e))
        return EXIT_MODEL_LOAD_ERROR
    return 0


# -- cluster commands -------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    from imagebatch.client import Client

    return Client(namespace=args.namespace, kubeconfig=args.kubeconfig, context=args.context)


class ProgressLine:
    """A progress bar drawn from the job's status: one redrawn line on a terminal, a line per
    change otherwise (logs, CI)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.t0 = time.monotonic()

    def __call__(self, p: Progress) -> None:
        width = 30
        frac = p.done / p.total if p.total else 0.0
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        parts = [f"{p.name} [{bar}] {p.done}/{p.total} images ({frac:.0%})"]
        if p.images_per_second:
            parts.append(f"{p.images_per_second} img/s")
        if p.eta and p.state == State.RUNNING:
            parts.append(f"ETA {p.eta}")
        parts.append(f"{p.active_replicas}/{p.desired_replicas} workers")
        if p.failed:
            parts.append(f"{p.failed} failed")
        parts.append(p.state)
        text = " | ".join(parts)
        if self.tty:
            self.out.write("\r\x1b[2K" + text + ("\n" if State(p.state).finished else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()


def _local_transform() -> Callable[[dict[str, Any]], dict[str, Any]]:
    """`submit --local`: the job for the local test cluster; says on stderr what it changed."""
    from imagebatch.localcluster import for_local_cluster, volumes_root

    def transform(doc: dict[str, Any]) -> dict[str, Any]:
        local, changes = for_local_cluster(doc, volumes_root())
        for change in changes:
            print(f"--local: {change}", file=sys.stderr)
        return local

    return transform


def _cmd_submit(args: argparse.Namespace) -> int:
    from imagebatch.client import JobFailedError

    client = _client(args)
    submitted = client.submit(args.job, _local_transform() if args.local else None)
    verb = "configured" if submitted.changed else "unchanged"
    print(f"imagebatchjob.imagebatch.dev/{submitted.name} {verb} (namespace {submitted.namespace})")
    if not args.wait:
        return 0
    client.namespace = submitted.namespace
    try:
        result = submitted.wait(on_progress=ProgressLine(sys.stderr), timeout=args.timeout)
    except JobFailedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{submitted.name}: Complete; {result.progress.done} images in {result.output}")
    return 0


def _cmd_wait(args: argparse.Namespace) -> int:
    from imagebatch.client import JobFailedError

    client = _client(args)
    try:
        result = client.wait(args.name, on_progress=ProgressLine(sys.stderr), timeout=args.timeout)
    except (JobFailedError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.name}: Complete; {result.progress.done} images in {result.output}")
    return 0


def _age(ts: str | None) -> str:
    from datetime import UTC, datetime

    if not ts:
        return ""
    s = int((datetime.now(UTC) - datetime.fromisoformat(ts.replace("Z", "+00:00"))).total_seconds())
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def status_rows(jobs: list[dict[str, Any]]) -> list[list[str]]:
    from imagebatch.client import Progress

    rows = [["NAME", "STATE", "PROGRESS", "IMG/S", "ETA", "WORKERS", "AGE"]]
    for job in jobs:
        p = Progress.of(job)
        rows.append(
            [
                p.name,
                p.state + (f" ({p.reason})" if p.state == State.FAILED else ""),
                f"{p.done}/{p.total}",
                p.images_per_second,
                p.eta if p.state == State.RUNNING else "",
                f"{p.active_replicas}/{p.desired_replicas}",
                _age(job["metadata"].get("creationTimestamp")),
            ]
        )
    return rows


def _cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    jobs = [client.get(args.name)] if args.name else client.list_jobs()
    if args.output == "json":
        print(json.dumps(jobs[0] if args.name else {"items": jobs}, indent=2))
        return 0
    if not jobs:
        print(f"No ImageBatchJobs in namespace {client.namespace}.", file=sys.stderr)
        return 0
    rows = status_rows(jobs)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if args.name:
        from imagebatch.client import job_state

        _, reason, message = job_state(jobs[0])
        if message:
            print(f"\n{reason}: {message}")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    failed = False
    for line in client.logs(args.name, follow=args.follow, tail=args.tail):
        if line.error:
            failed = True
            print(f"[{line.pod}] error: {line.text}", file=sys.stderr, flush=True)
        else:
            print(f"[{line.pod}] {line.text}", flush=args.follow)
    return 1 if failed else 0


def _cmd_suspend(args: argparse.Namespace) -> int:
    _client(args).set_suspend(args.name, args.command == "suspend")
    print(
        f"imagebatchjob.imagebatch.dev/{args.name} {'suspended' if args.command == 'suspend' else 'resumed'}"
    )
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    _client(args).delete(args.name)
    print(f'imagebatchjob.imagebatch.dev "{args.name}" deleted (its outputs stay where they are)')
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    client = _client(args)
    r = client.fetch(args.name, args.to, source=args.source, endpoint_url=args.endpoint_url)
    print(
        f"{args.name}: {r.images} image files listed in the manifest (with the manifest, index.html and "
        f"the data-set files): {r.copied} copied, {r.skipped} already there, into {r.to}"
    )
    return 0


def _cmd_retry_failed(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.retry_failed(args.name, args.new_name, source=args.source, endpoint_url=args.endpoint_url)
    n = len(job.applied["spec"]["promptItems"])
    print(f"{job.name}: makes the {n} failed items of {args.name} into its output")
    if not args.wait:
        return 0
    return _cmd_wait(argparse.Namespace(**{**vars(args), "name": job.name, "timeout": args.timeout}))


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="the job's namespace; default: the kubeconfig context's")
    p.add_argument("--kubeconfig", help="kubeconfig file; default: $KUBECONFIG or ~/.kube/config")
    p.add_argument("--context", help="kubeconfig context; default: the current one")


def build_parser(prog: str = "imagebatch") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Generate images in bulk with diffusion models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an ImageBatchJob manifest on this machine (resumes if run again)")
    run.add_argument("job", help="path to the ImageBatchJob YAML")
    run.add_argument("--output", help="override spec.output.uri")
    run.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cuda:N or cpu")
    run.add_argument("--batch-size", type=int, help="override spec.batching.batchSize")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    run.set_defaults(func=_cmd_run)

    val = sub.add_parser("validate", help="check a manifest and its prompts without running anything")
    val.add_argument("job")
    val.add_argument(
        "--cluster",
        action="store_true",
        help=(
            "check the locations as a cluster's workers would with the chart's default access rules "
            "(local paths inside spec.workers.volumeMounts, s3:// only; docs/security.md); the "
            "prompt file, on the workers' volumes, is not read"
        ),
    )
    val.set_defaults(func=_cmd_validate)

    wk = sub.add_parser(
        "worker", help="cluster mode: claim and process shards of an ImageBatchJob (in worker pods)"
    )
    wk.add_argument(
        "--namespace", default=os.environ.get("NAMESPACE"), help="the job's namespace ($NAMESPACE)"
    )
    wk.add_argument("--job", default=os.environ.get("JOB_NAME"), help="the ImageBatchJob's name ($JOB_NAME)")
    wk.add_argument(
        "--pod", default=os.environ.get("POD_NAME"), help="this pod's name, the claim holder ($POD_NAME)"
    )
    wk.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cuda:N or cpu")
    wk.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port; 0: none"
    )
    wk.add_argument(
        "--rank", type=int, help="internal: one engine process of a multi-GPU pod (set by its supervisor)"
    )
    wk.set_defaults(func=_cmd_worker)

    sb = sub.add_parser("submit", help="cluster: apply a job (again: no change); --wait to follow it")
    sb.add_argument("job", help="path to the ImageBatchJob YAML")
    sb.add_argument("--wait", action="store_true", help="draw progress; exit 0 when Complete, 1 when Failed")
    sb.add_argument(
        "--local",
        action="store_true",
        help="for the local test cluster (make cluster-up): builtin:tiny on the CPU, volumes and outputs "
        "in folders under $IMAGEBATCH_CLUSTER_DIR/volumes (see README)",
    )
    sb.add_argument("--timeout", type=float, help="with --wait: give up (exit 1) after this many seconds")
    _cluster_flags(sb)
    sb.set_defaults(func=_cmd_submit)

    wt = sub.add_parser("wait", help="cluster: follow a submitted job until Complete (0) or Failed (1)")
    wt.add_argument("name")
    wt.add_argument("--timeout", type=float, help="give up (exit 1) after this many seconds")
    _cluster_flags(wt)
    wt.set_defaults(func=_cmd_wait)

    st = sub.add_parser("status", help="cluster: a table of jobs (like kubectl get ibj), or one job")
    st.add_argument("name", nargs="?")
    st.add_argument("-o", "--output", choices=["table", "json"], default="table")
    _cluster_flags(st)
    st.set_defaults(func=_cmd_status)

    lg = sub.add_parser("logs", help="cluster: the worker pods' logs, each line prefixed by its pod")
    lg.add_argument("name")
    lg.add_argument("-f", "--follow", action="store_true", help="stream until the pods end")
    lg.add_argument("--tail", type=int, help="only the last N lines of each pod")
    _cluster_flags(lg)
    lg.set_defaults(func=_cmd_logs)

    for verb, text in (("suspend", "stop the job's workers (spec.suspend: true)"), ("resume", "go on")):
        sp = sub.add_parser(verb, help=f"cluster: {text}")
        sp.add_argument("name")
        _cluster_flags(sp)
        sp.set_defaults(func=_cmd_suspend)

    dl = sub.add_parser("delete", help="cluster: delete a job and its workers (not its outputs)")
    dl.add_argument("name")
    _cluster_flags(dl)
    dl.set_defaults(func=_cmd_delete)

    fe = sub.add_parser("fetch", help="copy a job's images, manifest and index.html here (resumable)")
    fe.add_argument("name")
    fe.add_argument("--to", required=True, help="local folder")
    fe.add_argument(
        "--from", dest="source", help="where the output is seen from here (a mounted volume), if not its uri"
    )
    fe.add_argument("--endpoint-url", help="S3 endpoint seen from here, if not spec.output.endpointUrl")
    _cluster_flags(fe)
    fe.set_defaults(func=_cmd_fetch)

    rf = sub.add_parser(
        "retry-failed", help="cluster: a new job that makes a finished job's failed items (errors.jsonl)"
    )
    rf.add_argument("name")
    rf.add_argument("--name", dest="new_name", help="the new job's name; default: <name>-retry")
    rf.add_argument("--from", dest="source", help="where the output is seen from here, if not its uri")
    rf.add_argument("--endpoint-url", help="S3 endpoint seen from here, if not spec.output.endpointUrl")
    rf.add_argument("--wait", action="store_true", help="follow the new job; exit 0 when Complete")
    rf.add_argument("--timeout", type=float, help="with --wait: give up (exit 1) after this many seconds")
    _cluster_flags(rf)
    rf.set_defaults(func=_cmd_retry_failed)

    fm = sub.add_parser(
        "fetch-model",
        help="fill the Hugging Face cache (HF_HOME) with a model; the fetch step of spec.model.cache",
    )
    fm.add_argument("--model", required=True, help="Hugging Face repo id")
    fm.add_argument("--revision")
    fm.add_argument("--variant", help="weights variant, e.g. fp16")
    fm.add_argument("--pipeline", help="diffusers pipeline class (unused by the download; for the record)")
    fm.set_defaults(func=_cmd_fetch_model)
    return p


def main(argv: list[str] | None = None) -> int:
    # As a kubectl plugin (kubectl-imagebatch on PATH), help and errors say `kubectl imagebatch`.
    prog = "kubectl imagebatch" if os.path.basename(sys.argv[0]).startswith("kubectl-") else "imagebatch"
    args = build_parser(prog).parse_args(argv)
    _setup_logging(args.verbose)
    try:
        rc: int = args.func(args)
        return rc
    except ImageBatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    """The console scripts and `python -m imagebatch.cli`: a worker leaves at once (`_exit_now`)."""
    rc = main()
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        _exit_now(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
