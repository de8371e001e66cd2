"""Storage errors: refused credentials and unwritable paths fail with what to fix; passing
failures (5xx, throttling, resets, a flaky mount) are retried. The credentials are refused by a
real S3 API (moto's server, checking signatures); the transient read errors by a file that fails."""

from __future__ import annotations

import errno
import io
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from s3fs import S3FileSystem

from imagebatch import prompts
from imagebatch.api import ImageBatchJobSpec, Output
from imagebatch.errors import ImageBatchError, PromptFileError
from imagebatch.storage import Storage
from imagebatch.storage_errors import Kind, StorageError, classify, transient
from imagebatch_testing.s3 import S3Server, s3_server


def client_error(code: str, status: int = 403) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


def wrapped(cause: BaseException, exc: OSError) -> OSError:
    """As s3fs raises them: a Python error whose cause is botocore's."""
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("err", "remote", "kind"),
    [
        (wrapped(client_error("InvalidAccessKeyId"), PermissionError("m")), True, Kind.CREDENTIALS),
        (wrapped(client_error("SignatureDoesNotMatch"), PermissionError("m")), True, Kind.CREDENTIALS),
        (wrapped(client_error("AccessDenied"), PermissionError("m")), True, Kind.CREDENTIALS),
        (wrapped(client_error("403"), PermissionError("Forbidden")), True, Kind.CREDENTIALS),  # a HEAD
        (PermissionError("Forbidden"), True, Kind.CREDENTIALS),  # s3fs, the cause dropped
        (NoCredentialsError(), True, Kind.CREDENTIALS),
        (wrapped(client_error("SlowDown", 503), OSError(errno.EBUSY, "SlowDown")), True, Kind.TRANSIENT),
        (wrapped(client_error("InternalError", 500), OSError(121, "x")), True, Kind.TRANSIENT),
        (client_error("ServiceUnavailable", 503), True, Kind.TRANSIENT),
        (EndpointConnectionError(endpoint_url="http://s3"), True, Kind.TRANSIENT),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True, Kind.TRANSIENT),
        (OSError(errno.EIO, "I/O error"), False, Kind.TRANSIENT),
        (OSError(errno.ESTALE, "Stale file handle"), False, Kind.TRANSIENT),
        (OSError(errno.ETIMEDOUT, "timed out"), False, Kind.TRANSIENT),
        (TimeoutError(), False, Kind.TRANSIENT),
        (PermissionError(errno.EACCES, "Permission denied"), False, Kind.NOT_WRITABLE),
        (OSError(errno.EROFS, "Read-only file system"), False, Kind.NOT_WRITABLE),
        (FileNotFoundError(errno.ENOENT, "No such file"), False, Kind.MISSING),
        (wrapped(client_error("NoSuchBucket", 404), FileNotFoundError("m")), True, Kind.MISSING),
        (OSError(errno.ENOSPC, "No space left"), False, Kind.OTHER),
        (ValueError("x"), False, Kind.OTHER),
    ],
)
def test_classification(err: BaseException, remote: bool, kind: Kind) -> None:
    assert classify(err, remote=remote) is kind
    assert transient(err) is (kind is Kind.TRANSIENT)


@pytest.fixture(scope="module")
def checking_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, dict[str, str]]]:
    """A moto server of its own that checks credentials (the session's accepts any)."""
    with s3_server(str(tmp_path_factory.mktemp("s3auth") / "moto.log")) as server:
        server.create_bucket("team-out")
        good = server.enforce_auth()
        yield server, good


def use(monkeypatch: pytest.MonkeyPatch, creds: dict[str, str]) -> None:
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    # fsspec reuses a file system made with the same options, with the credentials it read then
    # (a worker, one process with one set of credentials, never switches).
    S3FileSystem.clear_instance_cache()


def test_good_credentials_work_and_wrong_ones_are_refused_with_what_to_fix(
    checking_s3: tuple[S3Server, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, good = checking_s3
    out = Output.model_validate(
        {
            "uri": "s3://team-out/run1",
            "endpointUrl": server.endpoint,
            "credentialsSecret": {"name": "s3-creds"},
        }
    )
    use(monkeypatch, good)
    Storage.for_output(out).write_bytes("job.json", b"{}")  # the server takes the right key
    for wrong in ({"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY"}, {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}):
        use(monkeypatch, {**good, **wrong})
        st = Storage.for_output(out)
        for op, args in ((st.exists, ("job.json",)), (st.write_bytes, ("job.json", b"{}"))):
            with pytest.raises(StorageError) as err:
                op(*args)  # type: ignore[operator]
            msg = str(err.value)
            assert msg.startswith(
                "spec.output.credentialsSecret: the credentials were refused for bucket 'team-out'"
            )
            assert "Secret 's3-creds'" in msg and "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in msg
    assert isinstance(err.value, ImageBatchError)  # a user error: fails the job at once


def test_a_prompt_file_with_refused_credentials(
    checking_s3: tuple[S3Server, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, good = checking_s3
    use(monkeypatch, good)
    opts = {"client_kwargs": {"endpoint_url": server.endpoint}}
    Storage("s3://team-out", opts).write_bytes("p.txt", b"a cat\n")
    spec = ImageBatchJobSpec.model_validate(
        {
            "model": {"name": "builtin:tiny"},
            "promptsFrom": {"uri": "s3://team-out/p.txt"},
            "output": {"uri": "/o"},
        }
    )
    assert [p.prompt for p in prompts.load_prompts(spec, opts)] == ["a cat"]
    use(monkeypatch, {**good, "AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY"})
    with pytest.raises(
        PromptFileError, match=r"credentials were refused for bucket 'team-out' \(spec.promptsFrom.uri"
    ):
        prompts.load_prompts(spec, opts)


def test_an_unwritable_output_path_names_spec_output_uri() -> None:
    # sysfs refuses new folders, even to root: a real EPERM.
    st = Storage("/sys/imagebatch-output")
    with pytest.raises(StorageError) as err:
        st.ensure_root()
    assert str(err.value).startswith("spec.output.uri: cannot write to '/sys/imagebatch-output' (")
    assert "set spec.output.uri to a location they can write" in str(err.value)


class Flaky(io.RawIOBase):
    """A file whose reads fail with `errno_` the first `failures` times at byte `at`."""

    state: dict[str, int] = {}

    def __init__(self, data: bytes, at: int, errno_: int) -> None:
        self.data, self.at, self.errno_, self.pos = data, at, errno_, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = (0, self.pos, len(self.data))[whence] + offset
        return self.pos

    def readinto(self, b: Any) -> int:
        if self.pos >= self.at and Flaky.state["failures"] > 0:
            Flaky.state["failures"] -= 1
            raise OSError(self.errno_, "flaky")
        n = min(len(b), self.at - self.pos if self.pos < self.at else len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_a_transient_read_error_is_retried_from_where_it_stopped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = "".join(f"prompt {i}\n" for i in range(5000)).encode()
    opened: list[int] = []

    def open_raw(uri: str, options: dict[str, Any] | None) -> IO[bytes]:
        opened.append(1)
        return io.BufferedReader(Flaky(data, len(data) // 2, errno.ESTALE), buffer_size=4096)  # type: ignore[return-value]

    monkeypatch.setattr(prompts, "_open_raw", open_raw)
    monkeypatch.setattr(prompts, "_is_hf_folder", lambda uri, options: False)
    monkeypatch.setattr(prompts, "READ_WAIT_SECONDS", 0.01)
    Flaky.state["failures"] = 2
    spec = ImageBatchJobSpec.model_validate(
        {"model": {"name": "builtin:tiny"}, "promptsFrom": {"uri": "/nfs/p.txt"}, "output": {"uri": "/o"}}
    )
    assert [p.prompt for p in prompts.load_prompts(spec)] == [f"prompt {i}" for i in range(5000)]
    assert len(opened) == 3  # reopened after each failure; nothing read twice, nothing lost
    Flaky.state["failures"] = prompts.READ_ATTEMPTS  # more than the retries: the error tells
    with pytest.raises(PromptFileError, match="spec.promptsFrom.uri: cannot read prompt file '/nfs/p.txt'"):
        prompts.load_prompts(spec)


def test_a_missing_prompt_file_is_not_retried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    real = prompts._open_raw

    def counting(uri: str, options: dict[str, Any] | None) -> IO[bytes]:
        calls.append(uri)
        return real(uri, options)

    monkeypatch.setattr(prompts, "_open_raw", counting)
    spec = ImageBatchJobSpec.model_validate(
        {
            "model": {"name": "builtin:tiny"},
            "promptsFrom": {"uri": str(tmp_path / "no.txt")},
            "output": {"uri": "/o"},
        }
    )
    with pytest.raises(PromptFileError, match="does not exist"):
        prompts.load_prompts(spec)
    assert len(calls) == 1


class FailingFront:
    """An HTTP front for the S3 server that answers the first `failures` requests with a 500
    InternalError, as a store in trouble does, and passes the rest through."""

    def __init__(self, backend: str, failures: int) -> None:
        import http.client
        import http.server
        import threading
        import urllib.parse

        self.failures = failures
        self.refused = 0
        target = urllib.parse.urlsplit(backend)
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's Expect: 100-continue

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if front.refused < front.failures:
                    front.refused += 1
                    xml = b"<Error><Code>InternalError</Code><Message>try again</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn.request(self.command, self.path, body, headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any  # noqa: N815 - http.server's names

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_storage_5xx_answers_are_retried_with_backoff(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the job's storage options (botocore's standard retry mode, 10 attempts; jittered
    backoff of up to 20 s a wait, so the test keeps to a few failures)."""
    use(monkeypatch, s3.env())
    s3.create_bucket("flaky-store")
    front = FailingFront(s3.endpoint, failures=3)
    try:
        out = Output(uri="s3://flaky-store/run", endpoint_url=front.endpoint)
        Storage.for_output(out).write_bytes("images/a.png", b"png")
        assert front.refused == 3
        assert s3.get("flaky-store", "run/images/a.png") == b"png"
    finally:
        front.close()
