"""The benchmark script runs end to end on the CPU, so its GPU path cannot rot unseen.

This checks that it runs and reports; it asserts no speed (speed is for benchmarks/results/).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_engine_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench-out"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/engine.py"),
            "--arch",
            "tiny",
            "--images",
            "4",
            "--batch",
            "2",
            "--single-images",
            "2",
            "--steps",
            "2",
            "--size",
            "32",
            "--repeats",
            "1",
            "--fast",
            "--negatives",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    by_event: dict[str, list[dict[str, object]]] = {}
    for rec in records:
        by_event.setdefault(str(rec["event"]), []).append(rec)
    assert by_event["env"][0]["arch"] == "tiny" and by_event["env"][0]["fast"] is True
    modes = {str(rec["mode"]): rec for rec in by_event["throughput"]}
    assert set(modes) == {"single_loop", "plain_batched", "engine_inline", "engine"}
    assert all(float(str(m["images_per_s"])) > 0 for m in modes.values())
    ratio = by_event["ratio"][0]
    assert float(str(ratio["engine_vs_plain_batched"])) > 0
    assert float(str(ratio["engine_vs_single_loop"])) > 0
    # The ratios are printed (pytest -rP shows them), never asserted: speed is for benchmarks/results.
    print(
        f"engine / plain batched {ratio['engine_vs_plain_batched']}, "
        f"engine / single loop {ratio['engine_vs_single_loop']} (smoke size: 4 images of 32x32, 2 steps)"
    )
    assert float(str(by_event["flops"][0]["flops_per_image"])) > 1e6
    assert len(list((out / "round0" / "images").glob("*.png"))) == 4
    # Text encoder calls: two per batch inside pipe(...); ahead, one per batch plus one per
    # distinct negative prompt (4 images in batches of 2, 2 negatives).
    text = {str(rec["mode"]): rec for rec in by_event["text"]}
    assert text["plain_batched"]["calls"] == text["engine_inline"]["calls"] == 2 * 2
    assert text["engine"]["calls"] == 2 + 2
    assert text["engine"]["rows"] == 4 + 2 and text["engine_inline"]["rows"] == 8
