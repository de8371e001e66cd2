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
from imagebatch.errors import ImageBatchError, PromptFileError, SpecError

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


class PromptReadError(Exception):
    """The prompt file could not be read for a passing reason (after READ_ATTEMPTS tries): not the
    user's error, so the attempt is retried; its text names the failure's kind only."""


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
        # reason is the codec's own words ("invalid start byte"), never the bytes themselves
        return PromptFileError(f"{URI_FIELD}: {uri!r} is not UTF-8 text ({e.reason} at byte {e.start})")
    if isinstance(e, IsADirectoryError):
        return PromptFileError(
            f"{URI_FIELD}: cannot read prompt file {uri!r}: it is a folder; for a Hugging Face "
            "save_to_disk folder set spec.promptsFrom.format: hf"
        )
    if storage_errors.classify(e, remote="://" in uri) is storage_errors.Kind.CREDENTIALS:
        return _RefusedError(uri, e)
    return PromptFileError(f"{URI_FIELD}: cannot read prompt file {uri!r}: {storage_errors.describe(e)}")


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
        except (OSError, EOFError) as e:  # a truncated or not-gzip stream
            raise PromptFileError(_gzip_error(uri, e)) from None


def _gzip_error(uri: str, e: BaseException) -> str:
    # gzip's own messages quote the file's first bytes ("Not a gzipped file (b'ey')"): not these.
    if uri.endswith(".gz") and isinstance(e, gzip.BadGzipFile | EOFError):
        what = "is not gzip data" if isinstance(e, gzip.BadGzipFile) else "ends before its gzip stream does"
        return f"{URI_FIELD}: {uri!r} {what}; give the file gzip'd whole, or drop the .gz from its name"
    return f"{URI_FIELD}: cannot read prompt file {uri!r}: {storage_errors.describe(e)}"


def read_text(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    return "".join(_text_lines(uri, storage_options))


def _item(where: str, data: dict[str, Any], keys: Iterable[str] = ()) -> PromptItem:
    """`keys`: the row's own field names in the file's order, to tell which one is wrong."""
    try:
        return PromptItem.model_validate(data)
    except ValidationError as e:
        raise PromptFileError(f"{where}: {describe_row_errors(e, list(keys))}") from None


# pydantic error types whose message holds only our own words and limits, never the input
# ("Input should be greater than or equal to 8"); any other (a validator's "got ...") is
# replaced by what the field expects.
_SAFE_ERROR_TYPES = frozenset(
    {
        "missing",
        "string_type",
        "string_too_short",
        "string_too_long",
        "int_type",
        "int_parsing",
        "int_from_float",
        "float_type",
        "float_parsing",
        "finite_number",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
    }
)
_EXPECTED = {
    "id": (
        "must start with a letter or digit and hold only letters, digits, '.', '_' and '-' "
        "(at most 128 characters)"
    ),
    "width": "must be a multiple of 8",
    "height": "must be a multiple of 8",
}
_FIELD_LIST = "id, prompt, negativePrompt, seed, width, height, steps, guidanceScale"


def describe_row_errors(err: ValidationError, keys: list[str]) -> str:
    """A prompt row's problems by field and by what was expected; never a value from the file,
    nor a field name the file made up (it may be anything: a header row of a token)."""
    lines: list[str] = []
    for e in err.errors():
        loc = e["loc"][0] if e["loc"] else None
        name = loc if isinstance(loc, str) and loc in _FIELDS else None
        if e["type"] == "extra_forbidden" or name is None:
            src = {_ALIASES.get(k, k): i for i, k in reversed(list(enumerate(keys, 1)))}
            pos = src.get(loc) if isinstance(loc, str) else None
            which = f"field {pos}" if pos else "a field"
            size = f" (a name of {len(loc.encode())} bytes)" if isinstance(loc, str) else ""
            line = f"{which}{size} is not a prompt field; the fields are {_FIELD_LIST}"
        elif e["type"] == "missing":
            line = f"{name}: required field is missing"
        elif e["type"] in _SAFE_ERROR_TYPES:
            line = f"{name}: {e['msg']}"
        else:
            line = f"{name}: {_EXPECTED.get(name, 'has a value of the wrong kind')}"
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


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
        """A missing column is named (its name is the spec's); the file's own are only counted."""
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
                count = f"{len(have)} {what}{'' if len(have) == 1 else 's'}"
                raise PromptFileError(
                    f"{where}: the {fmt} has no {col!r} {what} (spec.{field}) among its {count}: "
                    f"set spec.{field} to the one to use{rename}"
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
            # e.msg is the parser's own ("Expecting value"); str(e) and e.doc would hold the line.
            raise PromptFileError(
                f"{where} line {n}: malformed JSON ({e.msg} at column {e.colno} of "
                f"{len(line.rstrip(chr(10)).encode())} bytes); fix line {n}: each line must be one "
                'JSON object such as {"prompt": "a red bicycle"}, or a JSON string'
            ) from None
        except RecursionError:
            raise PromptFileError(
                f"{where} line {n}: the JSON is nested too deeply; each line must be one flat JSON "
                'object such as {"prompt": "a red bicycle"}, or a JSON string'
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
        yield _item(f"{where} line {n}", cols.row(obj), obj)


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
        yield _item(f"{where} line {reader.line_num}", cols.row(row), fields)


def _iter_batches(
    batches: Iterable[Any], where: str, cols: Columns, names: list[str]
) -> Iterator[PromptItem]:
    cols.check(where, names, "data set")
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield _item(f"{where}: row {n}", cols.row(row, strict=False), names)


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
            # pyarrow's messages may quote the file's bytes: only the kind of error is named.
            raise PromptFileError(
                f"{URI_FIELD}: {uri!r} is not a Parquet file that can be read ({type(e).__name__}); "
                "write it with pyarrow or pandas (to_parquet), or set spec.promptsFrom.format"
            ) from None
        names = pf.schema_arrow.names
        where = f"{URI_FIELD}: {uri}"
        cols.check(where, names, "parquet")
        yield from _iter_batches(
            pf.iter_batches(batch_size=BATCH_ROWS, columns=_wanted_columns(cols, names)), where, cols, names
        )


def iter_hf(
    uri: str,
    storage_options: dict[str, Any] | None,
    cols: Columns,
    guard: Callable[[str], None] | None = None,
) -> Iterator[PromptItem]:
    """A `Dataset.save_to_disk` folder: state.json lists Arrow stream files, read batch by batch.

    `guard` is asked about every local file before it is opened: a member may be a link."""
    import pyarrow as pa

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    local = "://" not in uri
    if guard is not None and local:
        guard(f"{root}/state.json")
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
    except (ValueError, RecursionError):
        raise PromptFileError(
            f"{URI_FIELD}: {uri!r}: state.json is not the JSON that Dataset.save_to_disk writes"
        ) from None
    entries = state.get("_data_files") if isinstance(state, dict) else None
    files = [f.get("filename") for f in entries or [] if isinstance(f, dict)]
    if not files:
        raise PromptFileError(f"spec.promptsFrom.uri: {uri!r}: state.json lists no data files")
    for i, name in enumerate(files, 1):
        # A name is the file's own data: it must be a plain file name of the folder, and it is
        # never quoted (only its place in the list).
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise PromptFileError(
                f"{URI_FIELD}: {uri!r}: data file {i} of state.json is not a plain file name in the "
                "folder; the folder must be the one Dataset.save_to_disk wrote"
            )
        where = f"{URI_FIELD}: {uri} (data file {i} of state.json)"
        if guard is not None and local:
            guard(f"{root}/{name}")
        with fs.open(f"{root}/{name}", "rb") as f:
            try:
                reader = pa.ipc.open_stream(f)
                names = reader.schema.names
            except Exception as e:  # ArrowInvalid's text may quote the bytes
                raise PromptFileError(
                    f"{where}: not an Arrow stream ({type(e).__name__}); the folder must be the one "
                    "Dataset.save_to_disk wrote"
                ) from None
            yield from _iter_batches(reader, where, cols, names)


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
    guard: Callable[[str], None] | None = None,
) -> Iterator[PromptItem]:
    """All prompts of a job, in order, one at a time. A ConfigMap source needs a reader (cluster mode).

    `guard` (cluster mode: imagebatch.access) is called with the prompt file's URI, and with
    every local file of a data set folder, before anything is opened; it raises to refuse.
    Whatever goes wrong in reading or parsing ends as a PromptFileError that names the input
    by field, line and size, never by its content.
    """
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
        text = config_map_reader(ref.name, ref.key)
        yield from _described(lambda: iter(parse_prompts(text, fmt, where, src)), where)
        return
    uri = src.uri
    assert uri is not None
    if guard is not None:
        guard(uri)
    where = f"{URI_FIELD}: {uri}"

    def rows() -> Iterator[PromptItem]:
        fmt = src.format or ("hf" if _is_hf_folder(uri, storage_options) else file_format(uri, None))
        if fmt == "parquet":
            yield from iter_parquet(uri, storage_options, cols)
        elif fmt == "hf":
            yield from iter_hf(uri, storage_options, cols, guard)
        else:
            yield from TEXT_READERS[fmt](_text_lines(uri, storage_options), where, cols)

    try:
        yield from _described(lambda: _non_empty(rows(), where), where)
    except _RefusedError as e:
        secret = spec.output.credentials_secret.name if spec.output.credentials_secret else None
        raise PromptFileError(
            str(storage_errors.credentials_refused(URI_FIELD, e.uri, e.err, secret))
        ) from None


def _described(make: Callable[[], Iterator[PromptItem]], where: str) -> Iterator[PromptItem]:
    """The prompts `make` yields; an error no reader turned into a PromptFileError (a library's
    exception, whose text may quote the input) becomes one that names only its kind."""
    try:
        yield from make()
    except ImageBatchError:
        raise
    except RecursionError:
        raise PromptFileError(f"{where}: the prompt file is nested too deeply to parse") from None
    except Exception as e:
        if storage_errors.transient(e):
            # Not the user's error: the worker's attempt fails and is retried, as before.
            raise PromptReadError(f"{where}: {storage_errors.describe(e)}; to be retried") from None
        raise PromptFileError(
            f"{where}: cannot parse the prompt file ({type(e).__name__}); check that it is the "
            "format its name or spec.promptsFrom.format says"
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
