"""A third output layout, defined here only: one class, registered, run through the real local
mode (engine, planner, manifest join untouched), and read back with `zipfile`."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imagebatch import layouts
from imagebatch.api import ImageBatchJob
from imagebatch.fingerprint import fingerprint, image_fields
from imagebatch.layouts import ContainerLayout, JoinFile, Made
from imagebatch.planning import expand_items
from imagebatch.prompts import iter_prompts
from imagebatch.worker.local import run_local


class ZipLayout(ContainerLayout):
    """zips/<shard>.zip, images stored uncompressed, and zips/index.jsonl listing every member."""

    name = "zip"

    def container_key(self, shard: str) -> str:
        return f"zips/{shard}.zip"

    def pack(self, made: Sequence[Made], images: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for m in made:
                z.writestr(zipfile.ZipInfo(m.key, (1980, 1, 1, 0, 0, 0)), images[m.key])
        data = buf.getvalue()
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for m in made:
                info = z.getinfo(m.key)
                # The data follows the local header: 30 bytes, the name, the extra field.
                name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
                m.line.update(
                    member=m.key, offset=info.header_offset + 30 + name_len + extra_len, size=info.file_size
                )
        return data

    def unpack(self, data: bytes) -> dict[str, bytes]:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return {n: z.read(n) for n in z.namelist()}

    def join_files(self) -> list[JoinFile]:
        return [JoinFile("zips/index.jsonl", lambda line: {"id": line["id"], "zip": line["key"]})]


@pytest.fixture
def zip_layout(monkeypatch: pytest.MonkeyPatch) -> Iterator[layouts.OutputLayout]:
    monkeypatch.setattr(layouts, "LAYOUTS", dict(layouts.LAYOUTS))  # registered for this test only
    yield layouts.register(ZipLayout())


def zip_job(out: Path) -> ImageBatchJob:
    job = ImageBatchJob.model_validate(
        {
            "apiVersion": "imagebatch.dev/v1alpha1",
            "kind": "ImageBatchJob",
            "metadata": {"name": "zipped"},
            "spec": {
                "model": {"name": "builtin:tiny"},
                "prompts": [f"prompt number {i}" for i in range(6)],
                "generation": {"width": 32, "height": 32, "steps": 2, "seed": 5},
                "batching": {"batchSize": 2, "shardSize": 4},
                "output": {"uri": str(out)},
            },
        }
    )
    # The API admits the built-in layouts only: a layout known to code alone is set past validation.
    output = job.spec.output.model_copy(update={"layout": "zip"})
    return job.model_copy(update={"spec": job.spec.model_copy(update={"output": output})})


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def test_a_zip_layout_is_one_class_and_runs_through_the_real_engine(tmp_path: Path, zip_layout: Any) -> None:
    out = tmp_path / "out"
    job = zip_job(out)
    summary = run_local(job, device="cpu", progress=False)
    assert summary.made == 6

    zips = sorted(p.name for p in (out / "zips").glob("*.zip"))
    assert zips == ["s00000.zip", "s00001.zip"]  # one per shard
    assert not (out / "images").exists() and not (out / "shards").exists()
    assert not (out / "metadata.jsonl").exists()  # the files layout's join file is not this one's
    lines = manifest(out)
    assert [x["id"] for x in lines] == [f"p{i:07d}" for i in range(6)]
    with zipfile.ZipFile(out / "zips/s00001.zip") as z:
        assert z.namelist() == ["p0000004.png", "p0000005.png"]  # named by the layout's writer
    for line in lines:
        assert line["key"] == f"zips/{line['shard']}.zip"
        with zipfile.ZipFile(out / line["key"]) as z:
            assert Image.open(io.BytesIO(z.read(line["member"]))).size == (32, 32)
        # The byte range the contact sheet reads is the image itself.
        data = (out / line["key"]).read_bytes()[line["offset"] : line["offset"] + line["size"]]
        assert Image.open(io.BytesIO(data)).size == (32, 32)
    index = [json.loads(x) for x in (out / "zips/index.jsonl").read_text().splitlines()]
    assert index == [{"id": x["id"], "zip": x["key"]} for x in lines]
    assert (out / "index.html").read_text().count('data-tar="zips/') == 6  # each image read from its zip

    # The layout is in the fingerprint: its output is not taken for a files-layout one.
    spec = job.spec
    items = expand_items(iter_prompts(spec, {}), spec.generation)
    recorded = json.loads((out / "job.json").read_text())["fingerprint"]
    assert recorded == fingerprint(image_fields(spec), items)
    files_spec = spec.model_copy(update={"output": spec.output.model_copy(update={"layout": "files"})})
    assert recorded != fingerprint(image_fields(files_spec), items)


def test_a_zip_shard_resumes_from_its_zip(tmp_path: Path, zip_layout: Any) -> None:
    out = tmp_path / "out"
    job = zip_job(out)
    run_local(job, device="cpu", progress=False)
    first = (out / "zips/s00001.zip").read_bytes()
    (out / "manifest/s00001.jsonl").unlink()  # as if killed between the zip and the part
    (out / "manifest.jsonl").unlink()
    again = run_local(job, device="cpu", progress=False)
    assert (again.made, again.skipped) == (0, 6)
    assert (out / "zips/s00001.zip").read_bytes() == first
    assert len(manifest(out)) == 6
