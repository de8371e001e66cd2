"""The contact sheet of a multi-page job in a real headless Chromium, for both layouts, and the
planning-memory benchmark end to end. Asserts what is shown, never how fast (that is
benchmarks/results/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def run_job(tmp_path: Path, layout: str, n: int) -> Path:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a tiny fox, number {i}\n" for i in range(n)))
    out = tmp_path / f"out-{layout}"
    job = {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatchJob",
        "metadata": {"name": f"sheet-{layout}"},
        "spec": {
            "model": {"name": "builtin:tiny"},
            "promptsFrom": {"uri": str(prompts)},
            "generation": {"width": 16, "height": 16, "steps": 1},
            "batching": {"batchSize": 64, "shardSize": 100},
            "output": {"uri": str(out), "layout": layout},
        },
    }
    path = tmp_path / f"{layout}.yaml"
    path.write_text(yaml.safe_dump(job))
    r = subprocess.run(
        [sys.executable, "-m", "imagebatch.cli", "run", str(path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return out


# CI installs Chromium (.ci/run) and must not count a skip as a pass: there it fails instead.
@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="needs Chromium (apt-get install chromium)"
)
@pytest.mark.parametrize(("layout", "http"), [("files", False), ("webdataset", True)])
def test_contact_sheet_pages_in_chromium(tmp_path: Path, layout: str, http: bool) -> None:
    out = run_job(tmp_path, layout, 450)  # 3 pages of 200
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/contact_sheet_browser.py"),
            str(out),
            "--chromium",
            str(CHROMIUM),
        ]
        + (["--http"] if http else [])
        + ["--screenshot", str(tmp_path / "page2.png")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    steps = {s["step"]: s for s in map(json.loads, r.stdout.splitlines())}
    assert [(k, v["first_id"], v["label"], v["figures"]) for k, v in steps.items()] == [
        ("first_page", "p0000000", "page 1 of 3", 200),
        ("next_page", "p0000200", "page 2 of 3", 200),
        ("arrow_key_page", "p0000400", "page 3 of 3", 50),
        ("last_page_by_url", "p0000400", "page 3 of 3", 50),
    ]
    # Every image in the viewport decoded (out of its tar, for webdataset); 16 px images in wider
    # tiles are the one case drawn with crisp pixels.
    assert all(v["visible_images"] > 0 and v["image_px"] == 16 for v in steps.values())
    assert all(v["image_rendering"] == "pixelated" for v in steps.values())
    assert (tmp_path / "page2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_memory_benchmark_runs(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/plan_memory.py"), "--rows", "20000"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["items"] == 20000 and result["shards"] == 79 and result["peak_rss_mib"] > 0
