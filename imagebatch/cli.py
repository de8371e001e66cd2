"""The `imagebatch` command: run a job locally, validate a manifest, print the CRD schema."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from imagebatch.errors import ImageBatchError

log = logging.getLogger("imagebatch")

EXIT_USER_ERROR = 2
EXIT_MODEL_LOAD_ERROR = 3  # as imagebatch.operator.labels: the Job's podFailurePolicy fails the job


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
    from imagebatch.prompts import load_prompts
    from imagebatch.storage import storage_options

    job = load_job(args.job)
    items = expand_items(load_prompts(job.spec, storage_options(job.spec.output)), job.spec.generation)
    print(f"{args.job}: valid; {len(items)} images")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
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


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from imagebatch.api import ModelSpec
    from imagebatch.errors import ModelLoadError
    from imagebatch.worker.pipeline import fetch_model  # torch is imported only by workers

    spec = ModelSpec(name=args.model, revision=args.revision, variant=args.variant, pipeline=args.pipeline)
    try:
        fetch_model(spec)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_MODEL_LOAD_ERROR
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagebatch", description="Generate images in bulk with diffusion models."
    )
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
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
