"""Outputs read by the real readers people use, never by our own parsers.

`imagebatch run` on the tiny model (a real subprocess), then: the `webdataset` package over the
shard tars, `datasets.load_dataset("imagefolder")` over the files layout, pyarrow over
manifest.parquet, and PIL over the metadata inside PNG, WebP and JPEG files.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_local import manifest, run_cli, write_job

from imagebatch.worker.imagemeta import EXIF_IFD, EXIF_USER_COMMENT, read_user_comment

N = 10


def prompts() -> list[dict[str, Any]]:
    # A comma, a quote and non-Latin-1 text: what breaks naive metadata writers.
    return [{"prompt": f'prompt, number {i} "quoted" — ünïcode', "seed": 100 + i} for i in range(N)]


def run_job(tmp_path: Path, **output: Any) -> Path:
    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        str(out),
        prompts=None,
        promptItems=prompts(),
        output={"uri": str(out), **output},
        generation={"width": 32, "height": 32, "steps": 2, "negativePrompt": "blurry"},
    )
    r = run_cli("run", str(job), "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


def test_webdataset_package_yields_every_image_once_with_its_json(tmp_path: Path) -> None:
    import webdataset as wds

    out = run_job(tmp_path, layout="webdataset")
    tars = sorted((out / "shards").glob("*.tar"))
    assert [t.name for t in tars] == ["s00000.tar", "s00001.tar", "s00002.tar"]  # shardSize 4
    assert not (out / "images").exists()  # no loose files: one write per shard
    lines = manifest(out)
    urls = [str(t) for t in tars]
    seen: dict[str, tuple[Image.Image, dict[str, Any]]] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        assert sample["__key__"] not in seen
        seen[sample["__key__"]] = (sample["png"], sample["json"])
    assert sorted(seen) == [line["id"] for line in lines]
    for line in lines:
        img, meta = seen[line["id"]]
        assert img.size == (32, 32)
        assert (meta["prompt"], meta["seed"], meta["shard"]) == (line["prompt"], line["seed"], line["shard"])
        # The manifest gives each image's byte range inside its tar (what the contact sheet reads).
        data = (out / line["key"]).read_bytes()[line["offset"] : line["offset"] + line["size"]]
        assert Image.open(io.BytesIO(data)).size == (32, 32)


def test_webdataset_resumes_a_shard_from_its_tar(tmp_path: Path) -> None:
    out = run_job(tmp_path, layout="webdataset")
    first = (out / "shards/s00001.tar").read_bytes()
    (out / "manifest/s00001.jsonl").unlink()  # as if killed between the tar and the part
    (out / "manifest.jsonl").unlink()
    r = run_cli("run", str(tmp_path / "job.yaml"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "(0 made, 10 already there)" in r.stdout
    with tarfile.open(fileobj=io.BytesIO(first)) as a, tarfile.open(out / "shards/s00001.tar") as b:
        old = {m.name: a.extractfile(m).read() for m in a.getmembers() if m.name.endswith(".png")}  # type: ignore[union-attr]
        new = {m.name: b.extractfile(m).read() for m in b.getmembers() if m.name.endswith(".png")}  # type: ignore[union-attr]
    assert old == new and len(new) == 4


def test_imagefolder_loads_every_image_with_prompt_and_seed(tmp_path: Path) -> None:
    import datasets

    out = run_job(tmp_path)
    lines = manifest(out)
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert len(ds) == N
    rows = sorted(ds, key=lambda r: r["id"])
    for row, line in zip(rows, lines, strict=True):
        assert (row["id"], row["prompt"], row["seed"]) == (line["id"], line["prompt"], line["seed"])
        assert row["image"].size == (32, 32)
        assert f"Seed: {line['seed']}" in row["parameters"]


def test_manifest_parquet_has_the_rows_of_manifest_jsonl(tmp_path: Path) -> None:
    out = run_job(tmp_path)
    table = pq.read_table(out / "manifest.parquet")
    assert table.to_pylist() == manifest(out)


def test_png_carries_a1111_parameters_and_the_manifest_line(tmp_path: Path) -> None:
    out = run_job(tmp_path)
    line = manifest(out)[3]
    with Image.open(out / line["key"]) as im:
        text = im.text  # type: ignore[attr-defined]
    params = text["parameters"]
    # AUTOMATIC1111's layout: the prompt, the negative prompt, then "Key: value" settings.
    first, neg, settings = params.split("\n")
    assert first == line["prompt"] and neg == "Negative prompt: blurry"
    assert f"Seed: {line['seed']}" in settings and "Steps: 2" in settings and "Size: 32x32" in settings
    embedded = json.loads(text["imagebatch"])
    assert (embedded["id"], embedded["prompt"], embedded["seed"]) == (
        line["id"],
        line["prompt"],
        line["seed"],
    )


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_webp_and_jpeg_carry_exif_and_xmp(tmp_path: Path, fmt: str) -> None:
    out = run_job(tmp_path, format=fmt)
    line = manifest(out)[2]
    with Image.open(out / line["key"]) as im:
        comment = im.getexif().get_ifd(EXIF_IFD)[EXIF_USER_COMMENT]
        xmp = im.info["xmp"]
    assert read_user_comment(comment).startswith(line["prompt"] + "\nNegative prompt: blurry\n")
    assert f"Seed: {line['seed']}" in read_user_comment(comment)
    xmp_text = xmp.decode() if isinstance(xmp, bytes) else xmp
    assert "imagebatch:manifest=" in xmp_text and str(line["seed"]) in xmp_text
