"""Names, labels, annotations and exit codes shared by the operator and the worker: the cluster-side
contract.

Kept free of kopf and torch so that both sides import it (and neither imports the other).
"""

from __future__ import annotations

from imagebatch.api import GROUP, VERSION

JOB_PLURAL = "imagebatchjobs"
SHARD_PLURAL = "imagebatchshards"

# Every child object carries the job's name, so one label selector finds them all.
LABEL_JOB = f"{GROUP}/job"
LABEL_COMPONENT = f"{GROUP}/component"
# Shards also carry their job's UID, and everyone selects them by it: a job deleted and re-created
# under the same name must never count, claim or adopt the shards of the old incarnation, which
# the garbage collector may still be deleting (thousands of them, in the background).
LABEL_JOB_UID = f"{GROUP}/job-uid"
# Shards carry the plan's size: the operator knows the plan is complete when it sees all of them,
# even when a worker (not the operator) planned a prompt file the operator cannot read.
ANNOTATION_SHARD_COUNT = f"{GROUP}/shard-count"
ANNOTATION_ITEM_COUNT = f"{GROUP}/item-count"
# Set on shard 0 by the worker that joined the manifest parts (value: the line count).
ANNOTATION_MANIFEST_LINES = f"{GROUP}/manifest-lines"

# The job's outputs at the root of spec.output.uri that its status names.
MANIFEST = "manifest.jsonl"
ERRORS = "errors.jsonl"  # every failed item and its error

# Prefix of a shard's status.error when the model could not be loaded: a user error, never retried.
MODEL_LOAD_ERROR = "ModelLoadError"

# Worker exit codes the Job's podFailurePolicy acts on.
EXIT_USER_ERROR = 2  # bad prompts or spec: fail the Job, do not retry
EXIT_MODEL_LOAD_ERROR = 3  # the model cannot be loaded: fail the Job, do not retry
EXIT_TERMINATED = 143  # stopped by SIGTERM (scale-in, suspend, drain): not a failure

API_VERSION = f"{GROUP}/{VERSION}"


def shard_name(job: str, uid: str, index: int) -> str:
    """`<job>-<8 hex digits of the job's UID>-s00000`.

    The UID part keeps the names of two incarnations of a job apart, so a re-created job plans at
    once instead of meeting a 409 on every shard of the old one until the garbage collector is
    done with it (or for ever, if something holds a finalizer on one). Kueue names a job's
    Workload the same way (owner name + a hash with its UID). Within one incarnation the names are
    deterministic, so the operator and workers that plan at the same time create each shard once.
    """
    return f"{job}-{uid.replace('-', '')[:8]}-s{index:05d}"


def worker_job_name(job: str) -> str:
    return f"{job}-workers"


def worker_account_name(job: str) -> str:
    return f"{job}-worker"
