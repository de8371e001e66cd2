"""What a job's workers may read and write: the admin's allowlist, checked before any byte moves.

In cluster mode a job is written by a tenant, and its workers hold things the tenant must not get:
their API token, their environment (the storage credentials), the image's files, and a network
position inside the cluster. So a URI in a job (spec.promptsFrom.uri, spec.output.uri) may name:

- a local path inside one of the job's own `spec.workers.volumeMounts`, judged after resolving it
  (`..` and symbolic links cannot leave the mount), never under the API token's or the kernel's
  folders (/var/run/secrets, /proc, /sys, /dev) nor inside a mount the operator adds (scratch space,
  the token, the model cache);
- a URI whose scheme the admin allows (the chart's `worker.access.schemes`, default s3 only); http
  and https also need their host in `worker.access.httpHosts`, and an s3 endpoint other than AWS's
  (spec.output.endpointUrl, or AWS_ENDPOINT_URL from the job's Secret) needs to be in
  `worker.access.s3Endpoints`.

The whole URI is parsed here, never by fsspec first: chained URLs (`simplecache::http://...`),
`data:` and any other scheme-like prefix are refused. The chart's values reach the operator as
flags, and the operator gives them to the worker pods it builds in IMAGEBATCH_ACCESS_POLICY (set
after the job's own env, so a job cannot widen them). Local mode (`imagebatch run`) is not confined.

Every refusal names the field, the rule and the chart value an admin changes; it never quotes
anything read, since nothing is read before the check.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from imagebatch.api import ImageBatchJobSpec
from imagebatch.errors import ImageBatchError

ENV_VAR = "IMAGEBATCH_ACCESS_POLICY"
PROMPTS_FIELD = "spec.promptsFrom.uri"
OUTPUT_FIELD = "spec.output.uri"
ENDPOINT_FIELD = "spec.output.endpointUrl"
CHART_LOCAL_PATHS = "worker.access.localPaths"
CHART_SCHEMES = "worker.access.schemes"
CHART_HTTP_HOSTS = "worker.access.httpHosts"
CHART_S3_ENDPOINTS = "worker.access.s3Endpoints"
ANY = "*"
# Never a prompt source nor an output, whatever a job mounts: the API token (kubelet and the
# operator put it under /var/run/secrets, which is /run/secrets once resolved), the process's
# environment and memory (/proc/self/environ holds the storage credentials), devices, sysfs.
FORBIDDEN_ROOTS = ("/var/run/secrets", "/run/secrets", "/proc", "/sys", "/dev")
# Mounts the operator adds to every worker (operator/builders.py: scratch space, the API token,
# the model cache): a path inside one of them is not in a volume the job declared, even when a
# declared mount above it (say at /home) would contain it by prefix.
OPERATOR_MOUNTS = (
    "/tmp",
    "/home/imagebatch/.cache",
    "/var/run/secrets/kubernetes.io/serviceaccount",
    "/var/cache/huggingface",
)
# A scheme as RFC 3986 spells it; anything else before "://" is refused.
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*$")
# "name:rest" without "//": fsspec reads `data:` this way; refuse every such prefix.
_SCHEME_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# Where botocore takes an endpoint from the environment (the job's credentials Secret, envFrom).
SECRET_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
S3_SCHEMES = frozenset({"s3", "s3a"})
HTTP_SCHEMES = frozenset({"http", "https"})


class AccessError(ImageBatchError):
    """A URI or path the cluster's access rules refuse; nothing was read or written."""


@dataclass(frozen=True)
class AccessPolicy:
    """The admin's rules for what workers may reach (the chart's worker.access values)."""

    local_paths: Literal["volumes", "any"] = "volumes"
    schemes: frozenset[str] = frozenset({"s3"})
    http_hosts: frozenset[str] = frozenset()
    s3_endpoints: frozenset[str] = frozenset()

    def to_env(self) -> str:
        return json.dumps(
            {
                "localPaths": self.local_paths,
                "schemes": sorted(self.schemes),
                "httpHosts": sorted(self.http_hosts),
                "s3Endpoints": sorted(self.s3_endpoints),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_settings(
        cls, local_paths: str, schemes: Iterable[str], http_hosts: Iterable[str], s3_endpoints: Iterable[str]
    ) -> AccessPolicy:
        if local_paths not in ("volumes", "any"):
            raise ValueError(f"local paths must be 'volumes' or 'any', not {local_paths!r}")
        clean = {s.strip().lower().removesuffix("://") for s in schemes if s.strip()}
        bad = sorted(s for s in clean if not _SCHEME_RE.match(s) and s != ANY)
        if bad:
            raise ValueError(f"not URI schemes: {', '.join(bad)}")
        return cls(
            local_paths="volumes" if local_paths == "volumes" else "any",
            schemes=frozenset(clean),
            http_hosts=frozenset(h.strip().lower() for h in http_hosts if h.strip()),
            s3_endpoints=frozenset(normal_endpoint(e) for e in s3_endpoints if e.strip()),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AccessPolicy:
        """The policy the operator gave this worker; without one, the chart's defaults (the
        strictest rules: a worker run without the operator is confined all the same)."""
        raw = (os.environ if environ is None else environ).get(ENV_VAR)
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            return cls.from_settings(
                str(data.get("localPaths", "volumes")),
                [str(s) for s in data.get("schemes", ["s3"])],
                [str(h) for h in data.get("httpHosts", [])],
                [str(e) for e in data.get("s3Endpoints", [])],
            )
        except (ValueError, TypeError, AttributeError):
            # Written by the operator only; a broken one must not open anything up.
            return cls()

    def allows_scheme(self, scheme: str) -> bool:
        return ANY in self.schemes or scheme in self.schemes


def normal_endpoint(url: str) -> str:
    """`https://minio.example:9000/` and `HTTPS://MINIO.example:9000` are the same endpoint."""
    url = url.strip()
    parts = urlsplit(url)
    if url == ANY or not parts.scheme or not parts.netloc:
        return url.rstrip("/").lower() if url != ANY else ANY
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


@dataclass(frozen=True)
class Mount:
    path: str  # the mountPath as the job wrote it
    read_only: bool


@dataclass(frozen=True)
class Target:
    """What a URI names once checked: a local path (resolved) or a remote URI with its scheme."""

    uri: str
    scheme: str | None  # None: a local path
    local_path: str | None = None


def declared_mounts(spec: ImageBatchJobSpec) -> list[Mount]:
    out: list[Mount] = []
    for m in spec.workers.volume_mounts or []:
        path = m.get("mountPath") if isinstance(m, dict) else None
        if isinstance(path, str) and path.startswith("/"):
            out.append(Mount(path, bool(m.get("readOnly"))))
    return out


def _inside(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root == "/" else root + "/")


def _mount_list(mounts: Iterable[Mount]) -> str:
    paths = sorted({m.path for m in mounts})
    return ", ".join(paths) if paths else "none"


def _scheme_of(uri: str) -> str | None:
    """The URI's scheme, lower-cased (as fsspec splits it: before the first "://"); None for a
    plain path."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    if _SCHEME_PREFIX_RE.match(uri):
        return uri.split(":", 1)[0].lower()
    return None


def check_uri(
    field_name: str,
    uri: str,
    spec: ImageBatchJobSpec,
    policy: AccessPolicy,
    write: bool = False,
    resolve: bool = True,
    environ: Mapping[str, str] | None = None,
) -> Target:
    """Refuses (AccessError) a URI the policy does not allow; else what it names.

    `resolve`: judge local paths after os.path.realpath (the worker, where the volumes are);
    False judges the path as written (the operator and `imagebatch validate`, which cannot see
    the volumes: the worker checks again). `environ`: the worker's environment, for the
    AWS_ENDPOINT_URL a credentials Secret may set.
    """
    if "::" in uri:
        raise AccessError(
            f"{field_name}: a chained URL ('::') is refused: workers open one location, named by "
            "one plain URI or path; nothing was read"
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise AccessError(f"{field_name}: the URI holds control characters; nothing was read")
    scheme = _scheme_of(uri)
    if scheme is None or scheme == "file":
        path = uri[len("file://") :] if scheme == "file" else uri
        if scheme == "file" and not uri.lower().startswith("file://"):
            raise AccessError(
                f"{field_name}: write file:///absolute/path or the path itself; nothing was read"
            )
        return _check_local(field_name, uri, path, spec, policy, write, resolve)
    if not _SCHEME_RE.match(scheme):
        raise AccessError(
            f"{field_name}: {uri!r} does not start with a URI scheme or a path; nothing was read"
        )
    if not policy.allows_scheme(scheme):
        allowed = ", ".join(f"{s}://" for s in sorted(policy.schemes)) or "none"
        raise AccessError(
            f"{field_name}: the URI scheme {scheme}:// is not allowed on this cluster (rule: URI "
            f"schemes are an allowlist; allowed: local paths in the job's volumes and {allowed}); "
            f"nothing was read. A cluster admin allows more with the chart value {CHART_SCHEMES}"
        )
    if scheme in HTTP_SCHEMES:
        netloc = urlsplit(uri).netloc
        # Parsers disagree about a user part, a backslash or an odd host: the one that checks
        # and the one that fetches must see the same host, so those are refused outright.
        if "@" in netloc or "\\" in uri or not _HOST_RE.match(netloc):
            raise AccessError(
                f"{field_name}: an http(s) URI must name a plain host (no user part, no backslash); "
                "nothing was read"
            )
        host = (urlsplit(uri).hostname or "").lower()
        port = urlsplit(uri).port if _port_ok(uri) else None
        hosts = policy.http_hosts
        if ANY not in hosts and host not in hosts and f"{host}:{port}" not in hosts:
            raise AccessError(
                f"{field_name}: the host {host or '(none)'} is not an allowed http host (rule: "
                f"http(s) URIs only to hosts an admin lists); nothing was read. A cluster admin "
                f"allows hosts with the chart value {CHART_HTTP_HOSTS}"
            )
    if scheme in S3_SCHEMES:
        check_s3_endpoint(spec, policy, environ)
    return Target(uri, scheme)


def _port_ok(uri: str) -> bool:
    try:
        urlsplit(uri).port  # noqa: B018 - raises for a port that is no number
    except ValueError:
        return False
    return True


def check_s3_endpoint(
    spec: ImageBatchJobSpec, policy: AccessPolicy, environ: Mapping[str, str] | None = None
) -> None:
    """An S3 endpoint other than AWS's must be on the admin's list: the job's endpointUrl, or the
    AWS_ENDPOINT_URL(_S3) its credentials Secret gives the workers."""
    env = {} if environ is None else environ
    # A Secret's value is never quoted (status readers may not read the Secret); the job's own is.
    named = [(ENDPOINT_FIELD, spec.output.endpoint_url, f" {spec.output.endpoint_url!r}")] + [
        (f"spec.output.credentialsSecret: its {var}", env.get(var), "") for var in SECRET_ENDPOINT_VARS
    ]
    allowed = policy.s3_endpoints
    for where, url, shown in named:
        if not url or ANY in allowed or normal_endpoint(url) in allowed:
            continue
        raise AccessError(
            f"{where}: the S3 endpoint{shown} is not allowed on this cluster (rule: S3 endpoints "
            f"other than AWS's are an allowlist); nothing was read or written. A cluster admin "
            f"allows endpoints with the chart value {CHART_S3_ENDPOINTS}"
        )


def _check_local(
    field_name: str,
    uri: str,
    path: str,
    spec: ImageBatchJobSpec,
    policy: AccessPolicy,
    write: bool,
    resolve: bool,
) -> Target:
    mounts = declared_mounts(spec)
    if not path.startswith("/") and policy.local_paths == "volumes":
        raise AccessError(
            f"{field_name}: {uri!r} is a relative path; in cluster mode give an absolute path inside "
            f"one of the job's volume mounts (spec.workers.volumeMounts: {_mount_list(mounts)}); "
            "nothing was read"
        )
    lexical = os.path.abspath(path)
    try:
        real = os.path.realpath(path) if resolve else lexical
    except OSError:  # a link it may not follow (/proc/1/root): never opened
        if not any(_inside(lexical, root) for root in FORBIDDEN_ROOTS):
            raise AccessError(
                f"{field_name}: {uri!r} cannot be resolved (a link the worker may not follow); "
                "nothing was read"
            ) from None
        real = lexical
    moved = real != os.path.normpath(path) or ".." in path.split("/")
    said = f"{uri!r} (after resolving '..' and symbolic links)" if moved else repr(uri)
    rule = (
        f"rule: workers read prompt files and write images only inside the job's own volumes; "
        f"the chart value {CHART_LOCAL_PATHS}"
    )
    if any(_inside(p, root) for root in FORBIDDEN_ROOTS for p in (real, lexical)):
        raise AccessError(
            f"{field_name}: {said} lies in the worker's own system folders (its API token, "
            "process or devices), which are never a prompt source or output (rule: a worker's "
            "token, environment and devices are never read for a job, whatever the chart allows); "
            "nothing was read"
        )
    if policy.local_paths == "any":
        return Target(uri, None, real)
    # The innermost mount holding the path decides: a declared one, or one the operator adds.
    best: tuple[int, Mount | None] = (-1, None)
    for m in mounts:
        root = os.path.realpath(m.path) if resolve else os.path.normpath(m.path)
        if _inside(real, root) and len(root) > best[0]:
            best = (len(root), m)
    for root in OPERATOR_MOUNTS:
        # A tie goes to the job's mount: the operator adds no scratch volume where the job has one.
        if _inside(real, root) and len(root) > best[0]:
            best = (len(root), None)
    mount = best[1]
    if mount is None:
        raise AccessError(
            f"{field_name}: {said} is not inside any of the job's volume mounts "
            f"(spec.workers.volumeMounts: {_mount_list(mounts)}) ({rule}); nothing was read; mount "
            "a volume that holds it, or point the field inside one"
        )
    if write and mount.read_only:
        raise AccessError(
            f"{field_name}: {uri!r} is on the volume mounted read-only at {mount.path}; set readOnly: "
            "false on that volumeMount, or point the output at a writable volume; nothing was written"
        )
    return Target(uri, None, real)


def check_job(
    spec: ImageBatchJobSpec,
    policy: AccessPolicy,
    resolve: bool = True,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Every location a job's workers would open: the prompt file first, then the output."""
    src = spec.prompts_from
    if src is not None and src.uri is not None:
        check_uri(PROMPTS_FIELD, src.uri, spec, policy, resolve=resolve, environ=environ)
    check_uri(OUTPUT_FIELD, spec.output.uri, spec, policy, write=True, resolve=resolve, environ=environ)


def local_guard(field_name: str, spec: ImageBatchJobSpec, policy: AccessPolicy) -> Callable[[str], None]:
    """A callable the prompt readers call with each local file they are about to open (a data
    set folder's member files too): a member that is a link out of the volume is refused."""

    def guard(path: str) -> None:
        check_uri(field_name, path, spec, policy)

    return guard
