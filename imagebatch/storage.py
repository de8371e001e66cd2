"""Output storage on a local path or S3-compatible object storage, through fsspec.

Keys are the contract: `images/<item id>.<ext>` (layout files) or `shards/<shard id>.tar`
(layout webdataset: `<item id>.<ext>` and `<item id>.json` inside), `manifest/<shard id>.jsonl`
(one part per shard), and `manifest.jsonl` (the parts joined); which image keys a job writes is
its layout's (imagebatch/layouts.py). Writes are atomic: temp file and rename on a
file system, one PUT on object storage, so a reader never sees half an image.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, Concatenate, ParamSpec, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from imagebatch.api import ImageBatchJobSpec, Output
from imagebatch.errors import ImageBatchError
from imagebatch.names import MANIFEST as MANIFEST  # noqa: PLC0414 (named by the status too)
from imagebatch.storage_errors import S3_RETRIES, user_error

MANIFEST_PARQUET = "manifest.parquet"
MANIFEST_PARTS = "manifest"
INDEX_HTML = "index.html"
# Hugging Face imagefolder metadata: file_name is relative to it, so images/<id>.<ext>.
HF_METADATA = "metadata.jsonl"
SHARDS = "shards"
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}


def image_key(item_id: str, fmt: str) -> str:
    return f"images/{item_id}.{EXTENSIONS[fmt]}"


def shard_tar_key(shard: str) -> str:
    return f"{SHARDS}/{shard}.tar"


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # where the member's bytes start in the tar, for readers that fetch a byte range
    size: int


def build_tar(files: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, Member]]:
    """A deterministic tar (mtime 0, given order): the same files give the same bytes on a rerun."""
    buf = io.BytesIO()
    members: dict[str, Member] = {}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            # The header (and a PAX header for a long name) comes first; the data ends the block.
            tar.addfile(info, io.BytesIO(data))
            end = tar.offset
            members[name] = Member(
                name, end - (-(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE), len(data)
            )
    return buf.getvalue(), members


def read_tar(data: bytes) -> dict[str, bytes]:
    """The regular files of a tar, by name."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m) if m.isfile() else None
            if f is not None:
                out[m.name] = f.read()
    return out


def manifest_part_key(shard: str) -> str:
    return f"{MANIFEST_PARTS}/{shard}.jsonl"


def storage_options(output: Output) -> dict[str, Any]:
    """fsspec options for the job's object storage (also used to read a prompt file there)."""
    if not output.uri.startswith("s3://"):
        return {}
    # botocore retries throttling, 5xx and dropped connections with backoff (storage_errors).
    options: dict[str, Any] = {"config_kwargs": {"retries": dict(S3_RETRIES)}}
    if output.endpoint_url:
        options["client_kwargs"] = {"endpoint_url": output.endpoint_url}
    return options


def read_options(spec: ImageBatchJobSpec, follow_redirects: bool = True) -> dict[str, Any]:
    """fsspec options for reading spec.promptsFrom.uri: the output's S3 settings for an s3://
    file. `follow_redirects` False (cluster mode): an allowed http host cannot send the worker
    on to one that is not (a redirect to a metadata address)."""
    uri = spec.prompts_from.uri if spec.prompts_from and spec.prompts_from.uri else ""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        return {} if follow_redirects else {"allow_redirects": False}
    if scheme in ("s3", "s3a") or not scheme:
        return storage_options(spec.output)
    return {}


P = ParamSpec("P")
R = TypeVar("R")


def _user_errors(method: Callable[Concatenate[Storage, P], R]) -> Callable[Concatenate[Storage, P], R]:
    """Refused credentials and an unwritable path become the user's error, naming what to fix."""

    def wrapper(self: Storage, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            err = user_error("spec.output.uri", self.uri, e, self.secret)
            if err is None:
                raise
            raise err from e

    return wrapper


class Storage:
    def __init__(self, uri: str, options: dict[str, Any] | None = None, secret: str | None = None) -> None:
        self.uri = uri
        # The Secret the workers' credentials come from (spec.output.credentialsSecret): errors name it.
        self.secret = secret
        try:
            self.fs, root = fsspec.core.url_to_fs(uri, **(options or {}))
        except (ImportError, ValueError) as e:
            raise ImageBatchError(f"spec.output.uri: cannot use {uri!r}: {e}") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/")

    @classmethod
    def for_output(cls, output: Output) -> Storage:
        secret = output.credentials_secret.name if output.credentials_secret else None
        return cls(output.uri, storage_options(output), secret)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    @_user_errors
    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def existing(self, keys: Iterable[str]) -> set[str]:
        """The keys that already exist; object stores are asked concurrently."""
        keys = list(keys)
        if self.local:
            return {k for k in keys if os.path.exists(self.path(k))}
        with ThreadPoolExecutor(16) as pool:
            found = pool.map(self.exists, keys)
            return {k for k, ok in zip(keys, found, strict=True) if ok}

    @_user_errors
    def write_bytes(self, key: str, data: bytes) -> None:
        path = self.path(key)
        if not self.local:
            self.fs.pipe_file(path, data)  # one PUT: atomic on S3
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[IO[bytes]]:
        """A file written piece by piece that appears whole or not at all: a temp file renamed
        on a file system; on object storage a (multipart) upload that completes when closed."""
        path = self.path(key)
        try:
            if not self.local:
                with self.fs.open(path, "wb") as remote:
                    yield remote
                return
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    yield f
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        except OSError as e:
            err = user_error("spec.output.uri", self.uri, e, self.secret)
            if err is None:
                raise
            raise err from e

    @_user_errors
    def read_bytes(self, key: str) -> bytes:
        data: bytes = self.fs.cat_file(self.path(key))
        return data

    @_user_errors
    def list(self, prefix: str) -> list[str]:
        """Keys under a prefix, sorted; temp files of interrupted writes are left out."""
        base = self.path(prefix).rstrip("/")
        if not self.fs.exists(base):
            return []
        paths = self.fs.find(base)
        keys = [p[len(self.root) + 1 :] if p.startswith(self.root) else p for p in paths]
        return sorted(k for k in keys if ".tmp-" not in k)

    def remove_interrupted_writes(self) -> int:
        """Deletes the temp files that writes killed half-way left behind; returns how many.

        Only for an output no other process writes to now (local mode owns its folder); object
        stores need nothing, they write each key in one PUT.
        """
        if not self.local or not os.path.isdir(self.root):
            return 0
        removed = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                if ".tmp-" in name:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(folder, name))
                        removed += 1
        return removed

    @_user_errors
    def ensure_root(self) -> None:
        if self.local:
            os.makedirs(self.root, exist_ok=True)
