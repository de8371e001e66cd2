"""Storage errors sorted into what a retry can fix and what only the user can.

Refused credentials and an unwritable output location fail the same way on every attempt: they
become an ImageBatchError naming the field (and the Secret) to fix, which fails the job at once.
Throttling, 5xx answers, timeouts and connection resets pass with time: botocore retries them on
object storage (`retry_config`, through s3fs), and `transient` tells callers which errors of a
file system (a flaky NFS mount) are worth another try.
"""

from __future__ import annotations

import errno
import os
from enum import Enum
from typing import Any

from imagebatch.errors import ImageBatchError

# What botocore does on its own for S3 (standard mode: 5xx, throttling, connection errors and
# timeouts, exponential backoff with jitter, up to 20 s a wait): retried quietly, never a failure
# while the store comes back within a minute or so.
S3_RETRIES = {"mode": "standard", "max_attempts": 10}

# S3 error codes of credentials the store does not accept (or a key without the permission).
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "AllAccessDisabled",
        "AccountProblem",
        "403",
    }
)
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "500",
        "502",
        "503",
        "504",
    }
)
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ESTALE,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EAGAIN,
        errno.EBUSY,  # s3fs: SlowDown / 503 after its own retries
        errno.EREMOTEIO,  # s3fs: 500 InternalError
    }
)
NOT_WRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR})


class Kind(Enum):
    CREDENTIALS = "credentials"  # the store refused who we are: fatal
    NOT_WRITABLE = "not-writable"  # a local path we may not write: fatal
    MISSING = "missing"  # no such file or bucket: fatal where it is read
    TRANSIENT = "transient"  # worth another try
    OTHER = "other"


class StorageError(ImageBatchError):
    """Object storage or a path refused us for a reason only the user can fix."""


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def error_code(err: BaseException) -> str | None:
    """The S3 error code (or HTTP status) of a botocore ClientError in the exception's chain."""
    for e in _chain(err):
        response: Any = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            code = response["Error"].get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code:
                return str(code)
            if status:
                return str(status)
    return None


def known_code(err: BaseException) -> str | None:
    """The S3 error code when it is one of the codes this module knows; a store (or anything
    that answers at the endpoint) may send any text as a code, and that is never quoted."""
    code = error_code(err)
    known = CREDENTIAL_CODES | TRANSIENT_CODES | {"NoSuchBucket", "NoSuchKey", "404"}
    return code if code in known else None


def describe(err: BaseException) -> str:
    """An error by its kind, never by its text: a library's message may quote what it read (a
    line of the file, a server's answer). The S3 code when known, else the exception's type and,
    for an OS error, the system's own words for its errno."""
    code = known_code(err)
    if code:
        return f"S3 error {code}"
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno:
            name = errno.errorcode.get(e.errno, str(e.errno))
            return f"{type(e).__name__} {name}: {os.strerror(e.errno)}"
    return type(err).__name__


def classify(err: BaseException, remote: bool = False) -> Kind:
    """What kind of failure `err` is; `remote`: it came from object storage (s3fs wraps the
    store's refusals in PermissionError without an errno)."""
    names = {type(e).__name__ for e in _chain(err)}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return Kind.CREDENTIALS
    code = error_code(err)
    if code in CREDENTIAL_CODES:
        return Kind.CREDENTIALS
    if code in TRANSIENT_CODES:
        return Kind.TRANSIENT
    if isinstance(err, FileNotFoundError) or code in ("NoSuchBucket", "NoSuchKey", "404"):
        return Kind.MISSING
    if isinstance(err, PermissionError) and remote:
        return Kind.CREDENTIALS
    if isinstance(err, OSError) and err.errno in NOT_WRITABLE_ERRNOS:
        return Kind.NOT_WRITABLE
    if isinstance(err, ConnectionError | TimeoutError):
        return Kind.TRANSIENT
    if names & {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
    }:
        return Kind.TRANSIENT
    if isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS:
        return Kind.TRANSIENT
    return Kind.OTHER


def transient(err: BaseException) -> bool:
    return classify(err, remote=True) is Kind.TRANSIENT


def bucket_of(uri: str) -> str:
    return uri.split("://", 1)[-1].split("/", 1)[0]


def credentials_refused(field: str, uri: str, err: BaseException, secret: str | None) -> StorageError:
    """`field`: where the refused location is set (spec.output.uri, spec.promptsFrom.uri)."""
    bucket = bucket_of(uri)
    if secret:
        fix = (
            f"put an AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY that may use s3://{bucket} in Secret "
            f"{secret!r}, or point spec.output.credentialsSecret at a Secret that has them"
        )
    else:
        fix = (
            "the workers use the credentials of spec.output.credentialsSecret (or of the pods' "
            "environment): set it to a Secret with an AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            f"that may use s3://{bucket}"
        )
    return StorageError(
        f"spec.output.credentialsSecret: the credentials were refused for bucket {bucket!r} "
        f"({field} {uri}; {describe(err)}); {fix}"
    )


def not_writable(field: str, path: str, err: OSError) -> StorageError:
    why = os.strerror(err.errno) if err.errno else type(err).__name__
    return StorageError(
        f"{field}: cannot write to {path!r} ({why}); mount a volume there that the worker pods may "
        "write (read-write, and writable for the pods' user: spec.workers.volumes and "
        f"spec.workers.volumeMounts), or set {field} to a location they can write"
    )


def user_error(field: str, uri: str, err: BaseException, secret: str | None = None) -> StorageError | None:
    """The user-facing error for a storage failure only the user can fix, else None."""
    kind = classify(err, remote="://" in uri and not uri.startswith("file://"))
    if kind is Kind.CREDENTIALS:
        return credentials_refused(field, uri, err, secret)
    if kind is Kind.NOT_WRITABLE and isinstance(err, OSError):
        return not_writable(field, getattr(err, "filename", None) or uri, err)
    if kind is Kind.MISSING and error_code(err) == "NoSuchBucket":
        return StorageError(
            f"{field}: bucket {bucket_of(uri)!r} does not exist; create it, or set {field} to an "
            "existing bucket"
        )
    return None
