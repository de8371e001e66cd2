"""`imagebatch run`: a whole job on one machine, as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagebatch_testing.s3 import S3Server

REPO = Path(__file__).resolve().parents[2]


def write_job(path: Path, output_uri: str, **spec: Any) -> Path:
    body: dict[str, Any] = {
        "model": {"name": "builtin:tiny"},
        "prompts": [f"prompt number {i}" for i in range(10)],
        "generation": {"width": 32, "height": 32, "steps": 3, "seed": 5},
        "batching": {"batchSize": 4, "shardSize": 4},
        "output": {"uri": output_uri},
    }
    body.update(spec)
    doc = {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatchJob",
        "metadata": {"name": "t"},
        "spec": body,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagebatch.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def test_run_writes_images_manifest_and_contact_sheet(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", str(out))
    r = run_cli("run", str(job), "--no-progress")
    assert r.returncode == 0, r.stderr
    lines = manifest(out)
    assert [x["id"] for x in lines] == [f"p{i:07d}" for i in range(10)]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"p{i:07d}.png" for i in range(10)]
    assert all(x["model"] == "builtin:tiny" and x["steps"] == 3 and "seconds_per_image" in x for x in lines)
    html = (out / "index.html").read_text()
    assert html.count("<img") == 10 and "prompt number 7" in html and f"seed {lines[0]['seed']}" in html
    assert "10 images in" in r.stdout
    assert "batch of 4 at 32x32, 3 steps" in r.stderr  # per-batch timings in the log

    again = run_cli("run", str(job), "--no-progress")  # nothing left to do: a no-op
    assert again.returncode == 0 and "(0 made, 10 already there)" in again.stdout


def test_progress_bar_shows_rate_and_eta(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.yaml", str(tmp_path / "out"))
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert "10/10" in r.stderr and "img/s" in r.stderr and "<" in r.stderr  # tqdm's elapsed<remaining


def run_on_a_terminal(*args: str) -> str:
    """The CLI with a pseudo-terminal (120 columns) as its stdout and stderr: what a user sees."""
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagebatch.cli", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )
    os.close(slave)
    out = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        out.extend(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


def test_log_lines_and_the_progress_bar_do_not_share_a_terminal_line(tmp_path: Path) -> None:
    """Each log line is written after the bar was cleared, never appended to the bar: on a
    terminal, no stretch between two carriage returns or newlines holds both."""
    job = write_job(tmp_path / "job.yaml", str(tmp_path / "out"), batching={"batchSize": 2, "shardSize": 4})
    text = run_on_a_terminal("run", str(job))
    pieces = [p for line in text.split("\n") for p in line.split("\r")]
    bars = [p for p in pieces if "%|" in p and "/10 [" in p]
    logs = [p for p in pieces if " INFO imagebatch." in p]
    assert bars and len(logs) >= 3, text[-2000:]  # per-batch log lines while the bar is drawn
    mixed = [p for p in pieces if "%|" in p and " INFO " in p]
    assert not mixed, mixed


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 600) -> Path:
    """The file a failpoint writes before it stops the process (a generous bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before reaching the failpoint"
        assert time.monotonic() < deadline, f"no {path} after {timeout:.0f}s"
        time.sleep(0.02)
    return path


def test_killed_run_resumes_with_one_image_and_line_per_item(tmp_path: Path) -> None:
    out = tmp_path / "out"
    n = 48
    job = write_job(
        tmp_path / "job.yaml",
        str(out),
        prompts=[f"prompt {i}" for i in range(n)],
        generation={"width": 32, "height": 32, "steps": 12, "seed": 1},
        batching={"batchSize": 2, "shardSize": 8},
    )
    # The run stops itself (SIGSTOP) once its 10th image is stored: shard 1 is 2/8 done, and the
    # engine has at most two more batches (4 images) in flight, so shard 1 cannot be complete.
    marks = tmp_path / "failpoints"
    marks.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagebatch.cli", "run", str(job), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "IMAGEBATCH_FAILPOINTS": "image-stored@10=stop",
            "IMAGEBATCH_FAILPOINT_DIR": str(marks),
        },
    )
    images = out / "images"
    try:
        mark = wait_for_file(marks / f"image-stored-{proc.pid}.json", proc)
        assert json.loads(mark.read_text())["shard"] == "s00001"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    made_before = len(list(images.glob("*.png")))
    assert made_before < n, "the run finished before the kill: the test proves nothing"
    assert not (out / "manifest.jsonl").exists()

    r = run_cli("run", str(job), "--no-progress")
    assert r.returncode == 0, r.stderr
    lines = manifest(out)
    ids = [x["id"] for x in lines]
    assert len(ids) == n and len(set(ids)) == n
    assert sorted(p.name for p in images.iterdir()) == sorted(f"{i}.png" for i in ids)  # no temp files left
    resumed = [x for x in lines if x.get("resumed")]
    assert 0 < len(resumed) < 8  # the interrupted shard's stored images were kept, not remade
    assert f"{n - made_before} made" in r.stdout


def test_s3_output(tmp_path: Path, s3: S3Server) -> None:
    s3.create_bucket("images")
    job = write_job(
        tmp_path / "job.yaml", "s3://images/run1", output={"uri": "s3://images/run1", "format": "webp"}
    )
    r = run_cli("run", str(job), "--no-progress", env=s3.env())
    assert r.returncode == 0, r.stderr
    keys = s3.keys("images", "run1/")
    assert len([k for k in keys if k.startswith("run1/images/") and k.endswith(".webp")]) == 10
    assert {"run1/manifest.jsonl", "run1/index.html", "run1/job.json"} <= set(keys)
    assert s3.get("images", "run1/manifest.jsonl").count(b"\n") == 10


def test_output_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli("run", str(write_job(tmp_path / "a.yaml", str(out))), "--no-progress").returncode == 0
    changed = write_job(
        tmp_path / "b.yaml", str(out), generation={"width": 32, "height": 32, "steps": 4, "seed": 5}
    )
    r = run_cli("run", str(changed), "--no-progress")
    assert r.returncode == 2
    assert "made with other settings" in r.stderr and "spec.output.uri" in r.stderr


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown field", {"generaton": {"steps": 3}}, "spec.generaton: unknown field"),
    (
        "width",
        {"generation": {"width": 30, "height": 32}},
        "spec.generation.width: must be a multiple of 8 (got 30; try 24)",
    ),
    (
        "steps",
        {"generation": {"steps": 0}},
        "spec.generation.steps: Input should be greater than or equal to 1",
    ),
    ("empty prompts", {"prompts": []}, "spec.prompts is empty: give at least one prompt"),
    (
        "unreadable file",
        {"prompts": None, "promptsFrom": {"uri": "missing.txt"}},
        "prompt file 'missing.txt' does not exist",
    ),
    (
        "malformed jsonl",
        {"prompts": None, "promptsFrom": {"uri": "bad.jsonl"}},
        "spec.promptsFrom.uri: bad.jsonl line 2: malformed JSON",
    ),
    (
        "unknown model",
        {"model": {"name": "acme/no-such-model"}},
        "spec.model.name: cannot load model 'acme/no-such-model'",
    ),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_one_clear_error_and_nothing_written(
    tmp_path: Path, case: str, change: dict[str, Any], message: str
) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "fine",\n')
    spec = {k: v for k, v in change.items() if v is not None}
    job = write_job(tmp_path / "job.yaml", "out", **spec)
    if change.get("prompts", 1) is None:
        doc = yaml.safe_load(job.read_text())
        del doc["spec"]["prompts"]
        job.write_text(yaml.safe_dump(doc))
    r = run_cli("run", str(job), "--no-progress", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_validate_does_not_load_torch(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.yaml", str(tmp_path / "out"))
    code = "import sys; from imagebatch.cli import main; rc = main(['validate', sys.argv[1]]); print('torch' in sys.modules); sys.exit(rc)"
    r = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "valid; 10 images" in r.stdout and r.stdout.strip().endswith("False")
