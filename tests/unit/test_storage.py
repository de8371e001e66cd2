"""Storage on a local path and on a real S3 API: the same keys, atomic writes, existence checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebatch.api import Output
from imagebatch.storage import Storage, image_key, manifest_part_key, storage_options
from imagebatch_testing.s3 import S3Server


def test_keys() -> None:
    assert image_key("p0000001", "png") == "images/p0000001.png"
    assert image_key("x", "jpeg") == "images/x.jpg"
    assert manifest_part_key("s00003") == "manifest/s00003.jsonl"


def test_local_write_is_atomic_and_listed(tmp_path: Path) -> None:
    st = Storage(str(tmp_path / "out"))
    st.write_bytes("images/a.png", b"1")
    st.write_bytes("images/a.png", b"2")  # overwrite replaces, never appends
    (tmp_path / "out/images/b.png.tmp-deadbeef").write_bytes(b"half")  # a crashed write's leftover
    assert st.read_bytes("images/a.png") == b"2"
    assert st.list("images") == ["images/a.png"]
    assert st.existing(["images/a.png", "images/b.png"]) == {"images/a.png"}
    assert not list((tmp_path / "out/images").glob("a.png.tmp-*"))
    # Resuming in local mode sweeps what the crash left, and only that.
    (tmp_path / "out/manifest").mkdir()
    (tmp_path / "out/manifest/s00001.jsonl.tmp-0badf00d").write_bytes(b"half")
    assert st.remove_interrupted_writes() == 2
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == ["a.png"]


def test_s3_round_trip(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    s3.create_bucket("roundtrip")
    out = Output(uri="s3://roundtrip/run1", endpoint_url=s3.endpoint)
    st = Storage.for_output(out)
    st.write_bytes("images/a.png", b"png-bytes")
    st.write_bytes("manifest/s00000.jsonl", b"{}\n")
    assert s3.keys("roundtrip") == ["run1/images/a.png", "run1/manifest/s00000.jsonl"]
    assert s3.get("roundtrip", "run1/images/a.png") == b"png-bytes"
    assert st.existing(["images/a.png", "images/b.png"]) == {"images/a.png"}
    assert st.list("images") == ["images/a.png"]
    assert storage_options(out) == {
        "client_kwargs": {"endpoint_url": s3.endpoint},
        "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 10}},  # backoff on 5xx, throttling
    }
