"""What is written once every shard is done, from the manifest parts alone, part by part."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagebatch import contact_sheet
from imagebatch.manifest import dumps_lines, imagefolder_line, join_outputs
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
    assert join_outputs(parts(tmp_path), "t", ["s00000", "s00001"], "files", expected=3) == 3
    data = (tmp_path / "manifest.jsonl").read_bytes()
    lines = [json.loads(x) for x in data.decode().splitlines()]
    assert data == b"".join((tmp_path / manifest_part_key(s)).read_bytes() for s in ("s00000", "s00001"))
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
    assert not list(tmp_path.glob("*.tmp-*"))


def reference_join(storage: Storage, title: str, shards: list[str], layout: str) -> dict[str, bytes]:
    """The join as it was before it streamed (everything in memory at once): what it wrote."""
    data = b"".join(storage.read_bytes(manifest_part_key(s)) for s in shards)
    lines = contact_sheet.parse_manifest(data)
    names: dict[str, None] = {}
    for line in lines:
        names.update(dict.fromkeys(line))
    buf = io.BytesIO()
    pq.write_table(pa.table({k: [line.get(k) for line in lines] for k in names}), buf)
    out = {"manifest.jsonl": data, "manifest.parquet": buf.getvalue()}
    if layout == "files":
        out["metadata.jsonl"] = dumps_lines(imagefolder_line(line) for line in lines)
    out.update({k: v.encode() for k, v in contact_sheet.render_pages(title, lines).items()})
    return out


def varied_parts(root: Path, n_parts: int, per_part: int) -> tuple[Storage, list[str]]:
    s = Storage(str(root))
    shards = [f"s{i:05d}" for i in range(n_parts)]
    for p, shard in enumerate(shards):
        lines: list[dict[str, Any]] = []
        for j in range(per_part):
            i = p * per_part + j
            line: dict[str, Any] = {
                "id": f"p{i:07d}",
                "key": f"images/p{i:07d}.png",
                "prompt": f"a <b>{i}</b> é",
            }
            line |= {"seed": i * 7919, "steps": 4, "negative_prompt": None if i % 3 else "blurry"}
            if p % 2:  # fields only some parts have, and a float column that starts as ints
                line |= {"resumed": True, "seconds_per_image": 1 if j == 0 else 0.25}
            lines.append(line)
        s.write_bytes(manifest_part_key(shard), dumps_lines(lines))
    return s, shards


@pytest.mark.parametrize("layout", ["files", "webdataset"])
def test_the_streamed_join_writes_what_the_whole_manifest_join_wrote(tmp_path: Path, layout: str) -> None:
    ref_store, shards = varied_parts(tmp_path / "ref", 7, 130)  # pages of 200 cross the parts
    expected = reference_join(ref_store, "job <1>", shards, layout)
    store, _ = varied_parts(tmp_path / "new", 7, 130)
    assert join_outputs(store, "job <1>", shards, layout, expected=910) == 910
    written = {
        str(p.relative_to(tmp_path / "new")): p.read_bytes()
        for p in (tmp_path / "new").rglob("*")
        if p.is_file() and not str(p.relative_to(tmp_path / "new")).startswith("manifest/")
    }
    assert sorted(written) == sorted(expected)
    for key, data in expected.items():
        if key != "manifest.parquet":  # row groups differ; rows and types below
            assert written[key] == data, key
    old, new = (
        pq.read_table(io.BytesIO(expected["manifest.parquet"])),
        pq.read_table(tmp_path / "new/manifest.parquet"),
    )
    assert new.schema == old.schema and new.to_pylist() == old.to_pylist()


def test_the_join_of_100k_lines_holds_one_part_at_a_time(tmp_path: Path) -> None:
    join_outputs(parts(tmp_path / "warm"), "t", ["s00000", "s00001"], "files")  # lazy imports: not the join's
    per_part, n_parts = 500, 200
    store = Storage(str(tmp_path / "big"))
    shards = [f"s{i:05d}" for i in range(n_parts)]
    for p, shard in enumerate(shards):
        rows = (
            {"id": f"p{i:07d}", "key": f"images/p{i:07d}.png", "prompt": f"prompt {i}", "seed": i}
            for i in range(p * per_part, (p + 1) * per_part)
        )
        store.write_bytes(manifest_part_key(shard), dumps_lines(rows))
    size = sum((tmp_path / "big" / manifest_part_key(s)).stat().st_size for s in shards)
    tracemalloc.start()
    try:
        assert join_outputs(store, "big", shards, "files", expected=per_part * n_parts) == 100_000
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 100,000 lines as Python dicts take about 15 times the manifest's size (the join that held
    # them all peaked at 130 MB here); a part (500 lines) and a page (200 rows), about 1 MB.
    assert (tmp_path / "big/manifest.jsonl").stat().st_size == size
    assert peak < size / 4, f"peak {peak / 1e6:.1f} MB traced for a {size / 1e6:.1f} MB manifest"
    assert pq.ParquetFile(tmp_path / "big/manifest.parquet").metadata.num_rows == 100_000
