"""Prompt sources: the inline list, a ConfigMap, or a file or data set on a path or object storage.

Files are read as a stream of rows (text line by line, Parquet and Arrow batch by batch), so a
million-row prompt file never sits whole in memory: `iter_prompts` yields one PromptItem at a time.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from pydantic import ValidationError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from imagebatch import storage_errors
from imagebatch.api import ImageBatchJobSpec, PromptItem, PromptsFrom
from imagebatch.errors import PromptFileError, SpecError, format_validation_error

TEXT_FORMATS = ("txt", "jsonl", "csv")
FORMATS = (*TEXT_FORMATS, "parquet", "hf")
# Rows per Arrow batch: big enough to be fast, small enough that a batch is a few MB.
BATCH_ROWS = 8192
# Headers may use snake_case or camelCase; both map onto PromptItem's fields.
_ALIASES = {"negative_prompt": "negativePrompt", "guidance_scale": "guidanceScale"}
_FIELDS = {"id", "prompt", "negativePrompt", "seed", "width", "height", "steps", "guidanceScale"}
HF_MARKERS = ("dataset_info.json", "state.json")
URI_FIELD = "spec.promptsFrom.uri"
# A read that fails for a passing reason (EIO or ESTALE on a flaky mount, a reset connection or
# a 503 from object storage) is retried this many times, the file reopened where it had got to.
READ_ATTEMPTS = 6
READ_WAIT_SECONDS = 0.5  # the first wait; then doubling (plus jitter), up to READ_WAIT_MAX
READ_WAIT_MAX = 15.0


def file_format(uri: str, declared: str | None) -> str:
    if declared:
        return declared
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    name = name.removesuffix(".gz")
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext in ("txt", "jsonl", "csv", "parquet"):
        return ext
    raise PromptFileError(
        f"spec.promptsFrom.uri: cannot tell the format of {uri!r} from its extension; name it .txt, "
        ".jsonl, .csv or .parquet (text ones optionally .gz), or set spec.promptsFrom.format "
        "(hf for a Hugging Face save_to_disk folder)"
    )


class _RefusedError(PromptFileError):
    """Refused credentials reading the prompt file; iter_prompts names the job's Secret in it."""

    def __init__(self, uri: str, err: BaseException) -> None:
        super().__init__(str(storage_errors.credentials_refused(URI_FIELD, uri, err, None)))
        self.uri, self.err = uri, err


def _open_error(uri: str, e: BaseException) -> PromptFileError:
    if isinstance(e, FileNotFoundError):
        return PromptFileError(
            f"{URI_FIELD}: prompt file {uri!r} does not exist; check the path "
            "(relative paths are read from the current directory)"
        )
    if isinstance(e, UnicodeDecodeError):
        return PromptFileError(f"{URI_FIELD}: {uri!r} is not UTF-8 text ({e.reason} at byte {e.start})")
    if isinstance(e, IsADirectoryError):
        return PromptFileError(
            f"{URI_FIELD}: cannot read prompt file {uri!r}: it is a folder; for a Hugging Face "
            "save_to_disk folder set spec.promptsFrom.format: hf"
        )
    if storage_errors.classify(e, remote="://" in uri) is storage_errors.Kind.CREDENTIALS:
        return _RefusedError(uri, e)
    return PromptFileError(f"{URI_FIELD}: cannot read prompt file {uri!r}: {e}")


def _retrying() -> Retrying:
    return Retrying(
        retry=retry_if_exception(storage_errors.transient),
        stop=stop_after_attempt(READ_ATTEMPTS),
        wait=wait_exponential_jitter(multiplier=READ_WAIT_SECONDS, max=READ_WAIT_MAX),
        reraise=True,
    )


def _open_raw(uri: str, storage_options: dict[str, Any] | None) -> IO[bytes]:
    f: IO[bytes] = fsspec.open(uri, "rb", **(storage_options or {})).open()
    return f


class _ResumingReader(io.RawIOBase):
    """A prompt file's bytes that survive a transient read error: the file is reopened and read
    on from the byte it had reached (tenacity's backoff in between). A missing file, or any
    error that is not transient, is raised at once."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None) -> None:
        super().__init__()
        self.uri = uri
        self.storage_options = storage_options
        self._f: IO[bytes] | None = None
        self._pos = 0

    def readable(self) -> bool:
        return True

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def _file(self) -> IO[bytes]:
        if self._f is None:
            f = _open_raw(self.uri, self.storage_options)
            if self._pos:
                f.seek(self._pos)
            self._f = f
        return self._f

    def _read_once(self, n: int) -> bytes:
        try:
            return self._file().read(n)
        except BaseException:
            self._drop()  # reopened by the next attempt
            raise

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data: bytes = _retrying()(self._read_once, len(view))
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seekable(self) -> bool:
        return True  # Parquet reads its footer first

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        f = _retrying()(self._file)
        self._pos = int(f.seek(offset, whence))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def open_now(self) -> None:
        _retrying()(self._file)

    def close(self) -> None:
        self._drop()
        super().close()


@contextmanager
def _open_binary(uri: str, storage_options: dict[str, Any] | None) -> Iterator[IO[bytes]]:
    """The file's bytes, gunzipped when the name ends in .gz."""
    try:
        raw = _ResumingReader(uri, storage_options)
        raw.open_now()  # a missing or refused file fails here, before anything is parsed
        with io.BufferedReader(raw, buffer_size=1 << 20) as buffered:
            f: IO[bytes] = buffered
            if uri.endswith(".gz"):
                f = gzip.GzipFile(fileobj=buffered)  # type: ignore[assignment]
            yield f
    except PromptFileError:
        raise
    except (OSError, ValueError) as e:
        raise _open_error(uri, e) from None


def _text_lines(uri: str, storage_options: dict[str, Any] | None) -> Iterator[str]:
    """Decoded text, line by line; `utf-8-sig` drops a BOM so it never joins the first prompt."""
    with _open_binary(uri, storage_options) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
        try:
            yield from text
        except UnicodeDecodeError as e:
            raise _open_error(uri, e) from None
        except (OSError, EOFError) as e:  # a truncated gzip stream
            raise PromptFileError(f"spec.promptsFrom.uri: cannot read prompt file {uri!r}: {e}") from None


def read_text(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    return "".join(_text_lines(uri, storage_options))


def _item(where: str, data: dict[str, Any]) -> PromptItem:
    try:
        return PromptItem.model_validate(data)
    except ValidationError as e:
        raise PromptFileError(f"{where}: {format_validation_error(e)}") from None


class Columns:
    """Which source column feeds which PromptItem field, from promptsFrom's column settings."""

    def __init__(self, src: PromptsFrom | None) -> None:
        self.prompt = (src.column if src else None) or "prompt"
        self.named = {
            "id": src.id_column if src else None,
            "seed": src.seed_column if src else None,
            "negativePrompt": src.negative_prompt_column if src else None,
        }

    def check(self, where: str, available: Iterable[str], fmt: str) -> None:
        """An unknown column is named in the error, with the ones there are."""
        have = list(available)
        wanted = [("promptsFrom.column", self.prompt)] + [
            (f"promptsFrom.{f}Column" if f != "negativePrompt" else "promptsFrom.negativePromptColumn", c)
            for f, c in self.named.items()
            if c
        ]
        for field, col in wanted:
            if col not in have:
                what = "field" if fmt == "jsonl" else "column"
                rename = f", or name that {what} {col!r} in the file" if field == "promptsFrom.column" else ""
                raise PromptFileError(
                    f"{where}: the {fmt} has no {col!r} {what} (spec.{field}); its {what}s are "
                    f"{', '.join(map(repr, have)) or 'none'}: set spec.{field} to the one to use{rename}"
                )

    def row(self, row: dict[str, Any], strict: bool = True) -> dict[str, Any]:
        """A source row as PromptItem input: the chosen columns, plus same-named ones.

        strict (hand-written JSONL and CSV): other keys go on to be refused as unknown fields, so a
        typo is caught; a data set's other columns (urls, scores) are left out instead.
        """
        out: dict[str, Any] = {}
        taken = {self.prompt, *(c for c in self.named.values() if c)}
        for k, v in row.items():
            if v is None or v == "" or not k or k in taken:
                continue
            key = _ALIASES.get(k, k)
            if self.named.get(key):
                continue  # a named column replaces the same-named one
            if key in _FIELDS or strict:
                out[key] = v
        out["prompt"] = row.get(self.prompt)
        for field, col in self.named.items():
            if col and row.get(col) not in (None, ""):
                out[field] = row[col]
        if isinstance(out.get("id"), int):
            out["id"] = str(out["id"])
        return out


def iter_txt(lines: Iterable[str], where: str, cols: Columns) -> Iterator[PromptItem]:
    for n, line in enumerate(lines, 1):
        if line.strip():
            yield _item(f"{where} line {n}", {"prompt": line.strip()})


def iter_jsonl(lines: Iterable[str], where: str, cols: Columns) -> Iterator[PromptItem]:
    checked = False
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(
                f"{where} line {n}: malformed JSON ({e.msg} at column {e.colno}); fix line {n}: each "
                'line must be one JSON object such as {"prompt": "a red bicycle"}, or a JSON string'
            ) from None
        if isinstance(obj, str):
            obj = {cols.prompt: obj}
        if not isinstance(obj, dict):
            raise PromptFileError(
                f"{where} line {n}: expected a JSON object or string, got {type(obj).__name__}; fix "
                f'line {n} to read like {{"prompt": "a red bicycle"}}'
            )
        if not checked:
            cols.check(f"{where} line {n}", obj.keys(), "jsonl")
            checked = True
        yield _item(f"{where} line {n}", cols.row(obj))


def iter_csv(lines: Iterable[str], where: str, cols: Columns) -> Iterator[PromptItem]:
    # RFC 4180: quoted fields keep their commas, doubled quotes and line breaks.
    reader = csv.DictReader(iter(lines))
    fields = reader.fieldnames
    if not fields:
        return
    cols.check(f"{where} line 1 (the header)", fields, "csv")
    for row in reader:
        if None in row:
            raise PromptFileError(
                f"{where} line {reader.line_num}: more fields than the header has columns; quote a "
                'prompt that holds a comma ("a cat, in a hat")'
            )
        yield _item(f"{where} line {reader.line_num}", cols.row(row))


def _iter_batches(
    batches: Iterable[Any], where: str, cols: Columns, names: list[str]
) -> Iterator[PromptItem]:
    cols.check(where, names, "data set")
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield _item(f"{where}: row {n}", cols.row(row, strict=False))


def _wanted_columns(cols: Columns, names: list[str]) -> list[str]:
    """Read only the columns a PromptItem can use: a wide data set stays cheap to stream."""
    use = {cols.prompt, *(c for c in cols.named.values() if c)}
    use |= {k for k in names if _ALIASES.get(k, k) in _FIELDS}
    return [k for k in names if k in use]


def iter_parquet(uri: str, storage_options: dict[str, Any] | None, cols: Columns) -> Iterator[PromptItem]:
    import pyarrow.parquet as pq

    with _open_binary(uri, storage_options) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends for a non-Parquet file
            raise PromptFileError(f"spec.promptsFrom.uri: {uri!r} is not a Parquet file: {e}") from None
        names = pf.schema_arrow.names
        where = f"{URI_FIELD}: {uri}"
        cols.check(where, names, "parquet")
        yield from _iter_batches(
            pf.iter_batches(batch_size=BATCH_ROWS, columns=_wanted_columns(cols, names)), where, cols, names
        )


def iter_hf(uri: str, storage_options: dict[str, Any] | None, cols: Columns) -> Iterator[PromptItem]:
    """A `Dataset.save_to_disk` folder: state.json lists Arrow stream files, read batch by batch."""
    import pyarrow as pa

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    try:
        state = json.loads(fs.cat_file(f"{root}/state.json"))
    except FileNotFoundError:
        if fs.exists(f"{root}/dataset_dict.json"):
            raise PromptFileError(
                f"spec.promptsFrom.uri: {uri!r} is a DatasetDict; point the uri at one split's folder "
                f"(e.g. {uri.rstrip('/')}/train)"
            ) from None
        raise PromptFileError(
            f"spec.promptsFrom.uri: {uri!r} is not a Hugging Face save_to_disk folder (no state.json)"
        ) from None
    files = [f["filename"] for f in state.get("_data_files", [])]
    if not files:
        raise PromptFileError(f"spec.promptsFrom.uri: {uri!r}: state.json lists no data files")
    for name in files:
        with fs.open(f"{root}/{name}", "rb") as f:
            reader = pa.ipc.open_stream(f)
            yield from _iter_batches(reader, f"{URI_FIELD}: {uri}/{name}", cols, reader.schema.names)


TEXT_READERS: dict[str, Callable[[Iterable[str], str, Columns], Iterator[PromptItem]]] = {
    "txt": iter_txt,
    "jsonl": iter_jsonl,
    "csv": iter_csv,
}


def _non_empty(prompts: Iterator[PromptItem], where: str) -> Iterator[PromptItem]:
    empty = True
    for p in prompts:
        empty = False
        yield p
    if empty:
        raise PromptFileError(
            f"{where}: the prompt file holds no prompts; add at least one (.txt: a prompt per line; "
            '.jsonl: a JSON object per line, {"prompt": "a red bicycle"}; .csv: a header with a '
            "prompt column, then a row per prompt)"
        )


def parse_prompts(text: str, fmt: str, where: str, src: PromptsFrom | None = None) -> list[PromptItem]:
    lines = io.StringIO(text.removeprefix("\ufeff"), newline="")
    return list(_non_empty(TEXT_READERS[fmt](lines, where, Columns(src)), where))


def iter_prompts(
    spec: ImageBatchJobSpec,
    storage_options: dict[str, Any] | None = None,
    config_map_reader: Callable[[str, str], str] | None = None,
) -> Iterator[PromptItem]:
    """All prompts of a job, in order, one at a time. A ConfigMap source needs a reader (cluster mode)."""
    inline = spec.inline_prompts()
    if inline is not None:
        yield from (PromptItem(prompt=p) if isinstance(p, str) else p for p in inline)
        return
    src = spec.prompts_from
    assert src is not None  # the spec's validator guarantees one source
    cols = Columns(src)
    if src.config_map_key_ref is not None:
        ref = src.config_map_key_ref
        if config_map_reader is None:
            raise SpecError(
                "spec.promptsFrom.configMapKeyRef needs a cluster; for a local run use spec.promptsFrom.uri"
            )
        fmt = src.format or file_format(ref.key, None)
        where = f"spec.promptsFrom.configMapKeyRef: ConfigMap {ref.name} key {ref.key}"
        yield from parse_prompts(config_map_reader(ref.name, ref.key), fmt, where, src)
        return
    uri = src.uri
    assert uri is not None
    fmt = src.format or ("hf" if _is_hf_folder(uri, storage_options) else file_format(uri, None))
    if fmt == "parquet":
        rows = iter_parquet(uri, storage_options, cols)
    elif fmt == "hf":
        rows = iter_hf(uri, storage_options, cols)
    else:
        rows = TEXT_READERS[fmt](_text_lines(uri, storage_options), f"{URI_FIELD}: {uri}", cols)
    try:
        yield from _non_empty(rows, f"{URI_FIELD}: {uri}")
    except _RefusedError as e:
        secret = spec.output.credentials_secret.name if spec.output.credentials_secret else None
        raise PromptFileError(
            str(storage_errors.credentials_refused(URI_FIELD, e.uri, e.err, secret))
        ) from None


def _is_hf_folder(uri: str, storage_options: dict[str, Any] | None) -> bool:
    if "://" not in uri:
        return os.path.isfile(os.path.join(uri, "state.json"))
    try:
        fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        return bool(fs.exists(f"{root.rstrip('/')}/state.json"))
    except (OSError, ValueError):
        return False


def load_prompts(
    spec: ImageBatchJobSpec,
    storage_options: dict[str, Any] | None = None,
    config_map_reader: Callable[[str, str], str] | None = None,
) -> list[PromptItem]:
    """All prompts as a list: for small sources; planning streams through `iter_prompts`."""
    return list(iter_prompts(spec, storage_options, config_map_reader))
