"""What is written once every shard is done, from the manifest parts alone."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imagebatch.manifest import dumps_lines, join_outputs
from imagebatch.storage import Storage, manifest_part_key


def parts(root: Path) -> Storage:
    s = Storage(str(root))
    for shard, ids in (("s00000", ["a", "b"]), ("s00001", ["c"])):
        lines = [{"id": i, "key": f"images/{i}.png", "prompt": f"p {i}", "seed": 1, "steps": 2} for i in ids]
        if shard == "s00001":
            lines[0]["resumed"] = True  # a field only some lines have
        s.write_bytes(manifest_part_key(shard), dumps_lines(lines))
    return s


def test_parquet_and_imagefolder_metadata_follow_the_manifest(tmp_path: Path) -> None:
    data = join_outputs(parts(tmp_path), "t", ["s00000", "s00001"], "files", expected=3)
    lines = [json.loads(x) for x in data.decode().splitlines()]
    assert (tmp_path / "manifest.jsonl").read_bytes() == data
    rows = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    assert rows == [{**line, "resumed": line.get("resumed")} for line in lines]  # absent: null
    meta = [json.loads(x) for x in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [m["file_name"] for m in meta] == ["images/a.png", "images/b.png", "images/c.png"]
    assert meta[0]["parameters"].startswith("p a\nSteps: 2") and (tmp_path / "index.html").exists()


def test_webdataset_layout_writes_no_imagefolder_metadata(tmp_path: Path) -> None:
    join_outputs(parts(tmp_path), "t", ["s00000", "s00001"], "webdataset")
    assert not (tmp_path / "metadata.jsonl").exists() and (tmp_path / "manifest.parquet").exists()


def test_a_short_manifest_writes_nothing_else(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="manifest has 3 lines for 4 images"):
        join_outputs(parts(tmp_path), "t", ["s00000", "s00001"], "files", expected=4)
    assert not (tmp_path / "index.html").exists() and not (tmp_path / "manifest.parquet").exists()
