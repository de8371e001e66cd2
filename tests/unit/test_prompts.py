"""Prompt files: TXT, JSONL, CSV (gzip'd or not), Parquet and save_to_disk data sets, and errors
that name the file, line and column."""

from __future__ import annotations

import errno
import gzip
import io
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from imagebatch import prompts
from imagebatch.api import ImageBatchJobSpec
from imagebatch.errors import PromptFileError, SpecError
from imagebatch.prompts import iter_prompts, load_prompts
from imagebatch.storage import Storage
from imagebatch_testing.s3 import S3Server


def spec_for(uri: str, fmt: str | None = None) -> ImageBatchJobSpec:
    src: dict[str, str] = {"uri": uri}
    if fmt:
        src["format"] = fmt
    return ImageBatchJobSpec.model_validate(
        {"model": {"name": "builtin:tiny"}, "promptsFrom": src, "output": {"uri": "/tmp/o"}}
    )


def test_txt_skips_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n")
    assert [p.prompt for p in load_prompts(spec_for(str(f)))] == ["a cat", "a dog"]


def test_jsonl_objects_and_strings(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a cat", "id": "c1", "seed": 5, "negativePrompt": "dog"}\n"a bird"\n')
    ps = load_prompts(spec_for(str(f)))
    assert (ps[0].id, ps[0].seed, ps[0].negative_prompt) == ("c1", 5, "dog")
    assert ps[1].prompt == "a bird"


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": broken}\n')
    with pytest.raises(PromptFileError) as err:
        load_prompts(spec_for(str(f)))
    # The field, the file and its line, then what to change.
    assert str(err.value).startswith(f"spec.promptsFrom.uri: {f} line 3: malformed JSON (")
    assert 'fix line 3: each line must be one JSON object such as {"prompt": ' in str(err.value)


def test_jsonl_bad_field_names_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": "ok", "sede": 1}\n')
    # The field by its place and size, never by the name the file gave it.
    with pytest.raises(
        PromptFileError, match=r"p\.jsonl line 2: field 2 \(a name of 4 bytes\) is not a prompt field"
    ):
        load_prompts(spec_for(str(f)))


def test_csv_with_header(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text('id,prompt,seed,negative_prompt\nx1,"a cat, sitting",3,\nx2,a dog,,blurry\n')
    ps = load_prompts(spec_for(str(f)))
    assert [(p.id, p.prompt, p.seed, p.negative_prompt) for p in ps] == [
        ("x1", "a cat, sitting", 3, None),
        ("x2", "a dog", None, "blurry"),
    ]


def test_csv_without_prompt_column(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text("text\nhello\n")
    with pytest.raises(PromptFileError) as err:
        load_prompts(spec_for(str(f)))
    assert str(err.value) == (
        f"spec.promptsFrom.uri: {f} line 1 (the header): the csv has no 'prompt' column "
        "(spec.promptsFrom.column) among its 1 column: set spec.promptsFrom.column to the one "
        "to use, or name that column 'prompt' in the file"
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(spec_for(str(tmp_path / "nope.txt")))


def test_unreadable_file(tmp_path: Path) -> None:
    d = tmp_path / "dir.txt"
    d.mkdir()  # a directory cannot be read as a file, even by root
    with pytest.raises(PromptFileError, match="cannot read prompt file"):
        load_prompts(spec_for(str(d)))


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_prompts(spec_for(str(f)))


def test_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("\n\n")
    with pytest.raises(PromptFileError) as err:
        load_prompts(spec_for(str(f)))
    assert str(err.value).startswith(
        f"spec.promptsFrom.uri: {f}: the prompt file holds no prompts; add at least one (.txt: a prompt per line"
    )


def test_unknown_extension_needs_format(tmp_path: Path) -> None:
    f = tmp_path / "prompts.data"
    f.write_text("a cat\n")
    with pytest.raises(PromptFileError, match="set spec.promptsFrom.format"):
        load_prompts(spec_for(str(f)))
    assert len(load_prompts(spec_for(str(f), "txt"))) == 1


def test_configmap_source_needs_cluster() -> None:
    spec = ImageBatchJobSpec.model_validate(
        {
            "model": {"name": "builtin:tiny"},
            "promptsFrom": {"configMapKeyRef": {"name": "p", "key": "prompts.txt"}},
            "output": {"uri": "/tmp/o"},
        }
    )
    with pytest.raises(SpecError, match="needs a cluster"):
        load_prompts(spec)
    assert [p.prompt for p in load_prompts(spec, config_map_reader=lambda n, k: "x\ny\n")] == ["x", "y"]


def spec_with(uri: str, **src: str) -> ImageBatchJobSpec:
    return ImageBatchJobSpec.model_validate(
        {"model": {"name": "builtin:tiny"}, "promptsFrom": {"uri": uri, **src}, "output": {"uri": "/tmp/o"}}
    )


def test_csv_keeps_quoted_commas_and_drops_the_bom(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    # Excel's "CSV UTF-8": a BOM, CRLF line ends, RFC 4180 quoting (commas, doubled quotes, a newline).
    f.write_bytes(
        b'\xef\xbb\xbfprompt,seed\r\n"a cat, in a hat",1\r\n"say ""cheese"", please",2\r\n"two\r\nlines",3\r\n'
    )
    ps = load_prompts(spec_for(str(f)))
    assert [(p.prompt, p.seed) for p in ps] == [
        ("a cat, in a hat", 1),
        ('say "cheese", please', 2),
        ("two\r\nlines", 3),
    ]


def test_csv_unquoted_comma_is_an_error_not_a_cut_prompt(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text("prompt\na cat, in a hat\n")
    with pytest.raises(PromptFileError, match=r"p\.csv line 2: more fields than the header.*quote"):
        load_prompts(spec_for(str(f)))


def test_bom_is_dropped_from_txt_and_jsonl(tmp_path: Path) -> None:
    t = tmp_path / "p.txt"
    t.write_bytes(b"\xef\xbb\xbfa cat\n")
    j = tmp_path / "p.jsonl"
    j.write_bytes(b'\xef\xbb\xbf{"prompt": "a dog"}\n')
    assert load_prompts(spec_for(str(t)))[0].prompt == "a cat"
    assert load_prompts(spec_for(str(j)))[0].prompt == "a dog"


@pytest.mark.parametrize("name", ["p.txt.gz", "p.jsonl.gz", "p.csv.gz"])
def test_gzipped_text(tmp_path: Path, name: str) -> None:
    body = {
        "p.txt.gz": "a cat\na dog\n",
        "p.jsonl.gz": '{"prompt": "a cat"}\n"a dog"\n',
        "p.csv.gz": 'prompt\n"a cat"\na dog\n',
    }[name]
    f = tmp_path / name
    f.write_bytes(gzip.compress(body.encode()))
    assert [p.prompt for p in load_prompts(spec_for(str(f)))] == ["a cat", "a dog"]


def test_parquet_with_named_columns(tmp_path: Path) -> None:
    f = tmp_path / "p.parquet"
    table = pa.table(
        {
            "caption": ["a cat", "a dog", "a bird"],
            "uid": [10, 11, 12],
            "my_seed": [1, 2, 3],
            "neg": ["blurry", None, ""],
            "url": ["http://x/1", "http://x/2", "http://x/3"],  # other columns are left alone
        }
    )
    pq.write_table(table, f, row_group_size=2)
    spec = spec_with(
        str(f), column="caption", idColumn="uid", seedColumn="my_seed", negativePromptColumn="neg"
    )
    ps = load_prompts(spec)
    assert [(p.id, p.prompt, p.seed, p.negative_prompt) for p in ps] == [
        ("10", "a cat", 1, "blurry"),
        ("11", "a dog", 2, None),
        ("12", "a bird", 3, None),
    ]


def test_a_missing_column_is_named_and_the_files_own_only_counted(tmp_path: Path) -> None:
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["a cat"]}), f)
    with pytest.raises(
        PromptFileError,
        match=r"the parquet has no 'prompt' column \(spec.promptsFrom.column\) among its 1 column: set",
    ):
        load_prompts(spec_for(str(f)))
    with pytest.raises(PromptFileError, match=r"no 'seed' column \(spec.promptsFrom.seedColumn\)"):
        load_prompts(spec_with(str(f), column="caption", seedColumn="seed"))
    c = tmp_path / "p.csv"
    c.write_text("text\nhello\n")
    with pytest.raises(
        PromptFileError,
        match=r"the csv has no 'txt' column \(spec.promptsFrom.column\) among its 1 column: set",
    ):
        load_prompts(spec_with(str(c), column="txt"))


def test_hf_save_to_disk_folder(tmp_path: Path) -> None:
    import datasets

    d = tmp_path / "ds"
    datasets.Dataset.from_dict(
        {"text": [f"prompt {i}" for i in range(50)], "score": list(range(50))}
    ).save_to_disk(str(d), max_shard_size="1KB")
    assert len(list(d.glob("*.arrow"))) > 1  # several Arrow files, read in order
    ps = load_prompts(spec_with(str(d), column="text"))  # found as hf by its state.json
    assert [p.prompt for p in ps] == [f"prompt {i}" for i in range(50)]
    with pytest.raises(
        PromptFileError,
        match=r"\(data file 1 of state.json\): the data set has no 'prompt' column \(spec.promptsFrom.column\) "
        r"among its 2 columns",
    ):
        load_prompts(spec_with(str(d), format="hf"))


def test_iter_prompts_is_a_stream(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a cat\n" * 3 + "\n")
    it = iter_prompts(spec_for(str(f)))
    assert next(it).prompt == "a cat"  # a generator: nothing is read ahead into a list
    assert len(list(it)) == 2


def test_configmap_rejects_binary_formats() -> None:
    with pytest.raises(ValidationError, match="promptsFrom.format parquet needs promptsFrom.uri"):
        ImageBatchJobSpec.model_validate(
            {
                "model": {"name": "builtin:tiny"},
                "promptsFrom": {"configMapKeyRef": {"name": "p", "key": "k"}, "format": "parquet"},
                "output": {"uri": "/tmp/o"},
            }
        )


def test_parquet_gzip_and_save_to_disk_from_s3(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import datasets

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    s3.create_bucket("prompts")
    st = Storage("s3://prompts", {"client_kwargs": {"endpoint_url": s3.endpoint}})
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"]}), buf)
    st.write_bytes("p.parquet", buf.getvalue())
    st.write_bytes("p.csv.gz", gzip.compress(b'prompt\n"a cat, in a hat"\n'))
    d = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["a bird"]}).save_to_disk(str(d))
    for f in d.iterdir():
        st.write_bytes(f"ds/{f.name}", f.read_bytes())
    opts = {"client_kwargs": {"endpoint_url": s3.endpoint}}
    assert [p.prompt for p in load_prompts(spec_for("s3://prompts/p.parquet"), opts)] == ["a cat", "a dog"]
    assert [p.prompt for p in load_prompts(spec_for("s3://prompts/p.csv.gz"), opts)] == ["a cat, in a hat"]
    assert [p.prompt for p in load_prompts(spec_with("s3://prompts/ds", column="text"), opts)] == ["a bird"]


# -- error messages describe the input, never quote it (issue 18) -------------------------------

# A file at a worker's token path holds a JWT; the canary marks anything else the file holds.
JWT = (
    "eyJhbGciOiJSUzI1NiIsImtpZCI6IkNBTkFSWSJ9."
    "eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6dGVhbS1hOmZhLXdvcmtlciJ9.c2lnbmF0dXJlLWNhbmFyeQ"
)
CANARY = "zq-canary-5e1f"
SECRETS = (JWT, *JWT.split("."), "eyJ", CANARY, "canary", "7777")


def leaks(message: str) -> list[str]:
    return [s for s in SECRETS if s.lower() in message.lower()]


def refusal(spec: ImageBatchJobSpec, **kw: Any) -> str:
    with pytest.raises(PromptFileError) as err:
        load_prompts(spec, **kw)
    return str(err.value)


def _hf_folder(root: Path, state: bytes, arrow: bytes | None = None) -> Path:
    root.mkdir()
    (root / "state.json").write_bytes(state)
    (root / "dataset_info.json").write_text("{}")
    if arrow is not None:
        (root / "data-00000-of-00001.arrow").write_bytes(arrow)
    return root


def secret_files(d: Path) -> list[tuple[str, ImageBatchJobSpec]]:
    """One file (or folder) per parse error path, each holding the JWT and the canary."""
    cases: list[tuple[str, Path, dict[str, str]]] = []

    def file(name: str, data: bytes, **src: str) -> None:
        p = d / name
        p.write_bytes(data)
        cases.append((name, p, src))

    secret = f"{JWT} {CANARY}".encode()
    file("csv-header.csv", f"{JWT},{CANARY}\nx,y\n".encode())
    file("csv-extra-fields.csv", f"prompt\n{JWT},{CANARY}\n".encode())
    file("csv-bad-id.csv", f'id,prompt\n"{JWT}/{CANARY}",{CANARY}\n'.encode())
    file("csv-unknown-column.csv", f"prompt,{JWT}\n{CANARY},x\n".encode())
    file("csv-named-column.csv", f"{JWT}\n{CANARY}\n".encode(), column="text")
    file("jsonl-malformed.jsonl", b'{"prompt": "' + secret + b'" ' + secret + b"}\n")
    file("jsonl-not-object.jsonl", b"7777\n")
    file("jsonl-unknown-key.jsonl", json.dumps({"prompt": "x", JWT: CANARY}).encode())
    file("jsonl-first-keys.jsonl", json.dumps({JWT: CANARY}).encode())
    file("jsonl-bad-id.jsonl", json.dumps({"prompt": CANARY, "id": f"{JWT}/{CANARY}"}).encode())
    file("jsonl-bad-width.jsonl", json.dumps({"prompt": CANARY, "width": 7777}).encode())
    file("jsonl-bad-seed.jsonl", json.dumps({"prompt": CANARY, "seed": JWT}).encode())
    file("jsonl-bad-prompt.jsonl", json.dumps({"prompt": {JWT: CANARY}}).encode())
    file("jsonl-deep.jsonl", b"[" * 100_000 + secret + b"]" * 100_000)
    file("txt-not-utf8.txt", secret + b"\n" + secret + b"\xff\xfe" + secret + b"\n")
    file("txt-not-gzip.txt.gz", secret)
    file("jsonl-truncated.jsonl.gz", gzip.compress(secret * 50)[:40])
    file("parquet-not-parquet.parquet", b"PAR1" + secret + b"PAR1")
    file("parquet-garbage.parquet", secret * 3)
    buf = io.BytesIO()
    pq.write_table(pa.table({JWT: [CANARY]}), buf)
    file("parquet-columns.parquet", buf.getvalue())
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": [CANARY], "id": [f"{JWT}/{CANARY}"]}), buf)
    file("parquet-bad-id.parquet", buf.getvalue())
    file("txt-as-hf", secret, format="hf")
    specs = [(name, spec_with(str(p), **src)) for name, p, src in cases]
    hf = [
        ("hf-state-not-json", _hf_folder(d / "hf1", secret)),
        (
            "hf-state-names",
            _hf_folder(d / "hf2", json.dumps({"_data_files": [{"filename": f"../{JWT}"}]}).encode()),
        ),
        ("hf-state-shape", _hf_folder(d / "hf3", json.dumps({"_data_files": JWT}).encode())),
        (
            "hf-arrow-garbage",
            _hf_folder(
                d / "hf4",
                json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}).encode(),
                secret,
            ),
        ),
    ]
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, pa.schema([(JWT, pa.string())])) as w:
        w.write_batch(pa.record_batch([pa.array([CANARY])], names=[JWT]))
    hf.append(
        (
            "hf-arrow-columns",
            _hf_folder(
                d / "hf5",
                json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}).encode(),
                sink.getvalue(),
            ),
        )
    )
    specs += [(name, spec_with(str(p), format="hf")) for name, p in hf]
    return specs


def test_no_parse_error_quotes_the_file(tmp_path: Path) -> None:
    cases = secret_files(tmp_path)
    assert len(cases) >= 25
    for name, spec in cases:
        message = refusal(spec)
        assert message.startswith("spec.promptsFrom.uri: "), (name, message)
        assert leaks(message) == [], f"{name}: the message quotes the file: {message}"


def test_parse_errors_say_where_and_what_was_expected(tmp_path: Path) -> None:
    """Described by line, place and size: still enough to find and fix the line."""
    by_name = dict(secret_files(tmp_path))
    assert "line 1: field 2 (a name of " in refusal(by_name["jsonl-unknown-key.jsonl"])
    assert "is not a prompt field; the fields are id, prompt" in refusal(by_name["jsonl-unknown-key.jsonl"])
    assert "line 2: id: must start with a letter or digit" in refusal(by_name["csv-bad-id.csv"])
    assert "line 1: width: must be a multiple of 8" in refusal(by_name["jsonl-bad-width.jsonl"])
    assert "line 1: seed: Input should be a valid integer" in refusal(by_name["jsonl-bad-seed.jsonl"])
    malformed = refusal(by_name["jsonl-malformed.jsonl"])
    assert re.search(
        r"line 1: malformed JSON \(Expecting ',' delimiter at column \d+ of \d+ bytes\)", malformed
    )
    assert "line 2: more fields than the header has columns" in refusal(by_name["csv-extra-fields.csv"])
    assert "is not gzip data" in refusal(by_name["txt-not-gzip.txt.gz"])
    assert "is not UTF-8 text (invalid start byte at byte " in refusal(by_name["txt-not-utf8.txt"])
    assert "data file 1 of state.json is not a plain file name" in refusal(by_name["hf-state-names"])


def test_a_config_map_is_described_the_same_way() -> None:
    for key, text in [
        ("p.csv", f"{JWT}\n{CANARY}\n"),
        ("p.jsonl", f'{{"prompt": "{CANARY}", "{JWT}": 1}}\n'),
        ("p.jsonl", f"{JWT} {CANARY}\n"),
        ("p.csv", f'id,prompt\n"{JWT}/{CANARY}",{CANARY}\n'),
    ]:
        spec = ImageBatchJobSpec.model_validate(
            {
                "model": {"name": "builtin:tiny"},
                "promptsFrom": {"configMapKeyRef": {"name": "prompts", "key": key}},
                "output": {"uri": "/tmp/o"},
            }
        )
        message = refusal(spec, config_map_reader=lambda name, k, text=text: text)
        assert message.startswith(f"spec.promptsFrom.configMapKeyRef: ConfigMap prompts key {key}"), message
        assert leaks(message) == [], message


def test_a_library_error_is_named_by_its_kind_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a cat\n")

    def boom(lines: Any, where: str, cols: Any) -> Any:
        raise ValueError(f"unexpected {JWT} {CANARY}")
        yield  # a generator, as the readers are

    monkeypatch.setitem(prompts.TEXT_READERS, "txt", boom)
    message = refusal(spec_for(str(f)))
    assert message == (
        f"spec.promptsFrom.uri: {f}: cannot parse the prompt file (ValueError); check that it is "
        "the format its name or spec.promptsFrom.format says"
    )

    monkeypatch.undo()

    def gone(uri: str, options: Any) -> Any:
        raise OSError(errno.EACCES, f"{JWT} {CANARY}")

    monkeypatch.setattr(prompts, "_open_raw", gone)
    message = refusal(spec_for(str(f)))
    assert leaks(message) == [], message
    assert message.endswith(
        "cannot read prompt file " + repr(str(f)) + ": PermissionError EACCES: Permission denied"
    )


def test_a_storage_servers_words_are_not_quoted() -> None:
    """What answers at an S3 endpoint may send anything as its error code and message."""
    from imagebatch import storage_errors

    class ClientError(Exception):
        def __init__(self, code: str, message: str) -> None:
            super().__init__(f"An error occurred ({code}): {message}")
            self.response = {"Error": {"Code": code, "Message": message}}

    refused = storage_errors.credentials_refused(
        "spec.promptsFrom.uri", "s3://b/p.txt", ClientError("AccessDenied", f"{JWT} {CANARY}"), "keys"
    )
    assert "(spec.promptsFrom.uri s3://b/p.txt; S3 error AccessDenied)" in str(refused)
    odd = PermissionError(f"{JWT} {CANARY}")
    odd.__cause__ = ClientError(f"{CANARY}", f"{JWT}")
    for err in (odd, ClientError(JWT, CANARY)):
        message = str(storage_errors.credentials_refused("spec.output.uri", "s3://b/o", err, None))
        assert leaks(message) == [], message
    assert storage_errors.describe(OSError(errno.EIO, f"{JWT}")) == "OSError EIO: Input/output error"
