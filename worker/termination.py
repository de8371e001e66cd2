"""A worker's fatal error, written where Kubernetes reads a container's last words.

The kubelet copies the file at the container's terminationMessagePath (set on the worker
containers by the operator: /dev/termination-log) into
`status.containerStatuses[].state.terminated.message`, at most its last 4096 bytes; the operator
copies that message into the job's Failed condition, so the user reads the worker's error in
`kubectl get ibj -o yaml` without the pod's logs. IMAGEBATCH_TERMINATION_LOG overrides the path
(the test node agent, which cannot mount a file over /dev, points it at a file it reads back).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from imagebatch.errors import ImageBatchError

log = logging.getLogger(__name__)

ENV_VAR = "IMAGEBATCH_TERMINATION_LOG"
DEFAULT_PATH = "/dev/termination-log"
# The kubelet keeps at most this many bytes (the file's last ones); a longer message is cut here,
# at its end, so that its start (the field to fix) is what survives.
MAX_BYTES = 4096
# Exit code of a worker that failed with an unexpected error (as Python's own for a traceback).
EXIT_UNEXPECTED = 1


def path() -> str:
    return os.environ.get(ENV_VAR) or DEFAULT_PATH


def clip(message: str, limit: int = MAX_BYTES) -> bytes:
    data = message.encode()
    if len(data) <= limit:
        return data
    tail = " …(cut)".encode()
    # errors="ignore" drops a multi-byte character cut in half.
    return data[: limit - len(tail)].decode(errors="ignore").encode() + tail


def write(message: str) -> None:
    """Records `message` as the container's termination message; never raises.

    The default path is written only if it exists (the kubelet creates it before the container
    starts): a worker run by hand outside a pod must not create files in /dev.
    """
    target = path()
    if not os.environ.get(ENV_VAR) and not os.path.exists(target):
        return
    try:
        with open(target, "wb") as f:
            f.write(clip(message))
    except OSError as e:
        log.warning("cannot write the termination message to %s: %s", target, e)


def describe(err: BaseException) -> str:
    """The message for an error: a user error's own text; else `<Type>: <message>`, as the
    last line of a traceback says it."""
    if isinstance(err, ImageBatchError):
        return str(err)
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def reporting(main: Callable[[], int]) -> int:
    """Runs a worker process's main function so that every fatal error leaves its message.

    A user error (ImageBatchError) is recorded and raised on (the CLI prints it and exits 2);
    any other exception is logged with its traceback, recorded as `<Type>: <message>` and ends
    the process with exit code 1.
    """
    try:
        return main()
    except ImageBatchError as e:
        write(describe(e))
        raise
    except Exception as e:
        log.exception("unexpected error")
        write(describe(e))
        return EXIT_UNEXPECTED


def read(file: str) -> str:
    """A termination message file's text ('' when absent): the multi-GPU supervisor reads its
    children's."""
    try:
        with open(file, "rb") as f:
            return f.read()[-MAX_BYTES:].decode(errors="replace").strip()
    except OSError:
        return ""
