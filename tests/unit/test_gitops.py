"""The Argo CD health check and kstatus over ImageBatchJob objects of every state (testdata/,
taken from the local cluster by tests/e2e/test_gitops_live.py), each read by the real code: the
health.lua through gopher-lua (Argo CD's interpreter, with the libraries Argo CD opens) in the
format of argo-cd's resource_customizations tests, and kstatus through sigs.k8s.io/cli-utils.
Both come from hack/gitops (Go, built once and cached like the cluster binaries)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HEALTH = REPO / "resource_customizations" / "imagebatch.dev" / "ImageBatchJob"

# testdata file -> Argo CD health status; every case the check must cover.
ARGO = {
    "progressing.yaml": "Progressing",
    "healthy.yaml": "Healthy",
    "degraded.yaml": "Degraded",
    "suspended.yaml": "Suspended",
    "queued.yaml": "Suspended",
    "deleting.yaml": "Progressing",
    "stale-generation.yaml": "Progressing",
    "no-status.yaml": "Progressing",
    "degraded-without-message.yaml": "Degraded",
    "conditions-without-message-or-reason.yaml": "Progressing",
    "workers-failing.yaml": "Degraded",
}
# testdata file -> kstatus status (docs/operator.md, "GitOps"): Running, Queued, Suspended,
# Complete, Failed, and the two generic cases.
KSTATUS = {
    "progressing.yaml": "InProgress",
    "queued.yaml": "Current",
    "suspended.yaml": "Current",
    "healthy.yaml": "Current",
    "degraded.yaml": "Failed",
    "deleting.yaml": "Terminating",
    "stale-generation.yaml": "InProgress",
}


@pytest.fixture(scope="module")
def tool() -> Path:
    proc = subprocess.run(
        ["bash", str(REPO / "hack/gitops/build.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, f"hack/gitops/build.sh (needs Go): {proc.stderr[-2000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])


def argocd(tool: Path, folder: Path) -> tuple[int, list[dict[str, object]]]:
    proc = subprocess.run([str(tool), "argocd", str(folder)], capture_output=True, text=True, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()]


def test_health_test_yaml_covers_every_case() -> None:
    tests = yaml.safe_load((HEALTH / "health_test.yaml").read_text())["tests"]
    got = {Path(t["inputPath"]).name: t["healthStatus"]["status"] for t in tests}
    assert got == ARGO
    assert all(t["inputPath"].startswith("testdata/") and (HEALTH / t["inputPath"]).exists() for t in tests)


def test_the_lua_health_check_gives_every_expected_status_and_message(tool: Path) -> None:
    rc, results = argocd(tool, HEALTH)
    assert len(results) == len(ARGO)
    wrong = [r for r in results if "error" in r or r["got"] != r["want"]]
    assert rc == 0 and not wrong, wrong


def test_a_script_error_or_a_wrong_status_fails_the_runner(tool: Path, tmp_path: Path) -> None:
    """The runner cannot pass a broken script: the old snippet's nil concatenation is an error (gopher-lua: "cannot perform concat"),
    and a different status is a failure."""
    folder = tmp_path / "ImageBatchJob"
    shutil.copytree(HEALTH, folder)
    script = (folder / "health.lua").read_text()
    (folder / "health.lua").write_text(
        script.replace(
            'describe(conditions["Failed"], "Failed")',
            'conditions["Failed"].reason .. ": " .. conditions["Failed"].message',
        )
    )
    rc, results = argocd(tool, folder)
    errors = {Path(str(r["path"])).name: r.get("error") for r in results}
    assert rc == 1 and "cannot perform concat operation" in str(errors["degraded-without-message.yaml"]), (
        errors
    )
    (folder / "health.lua").write_text(
        script.replace('hs.status = "Suspended"', 'hs.status = "Progressing"', 1)
    )
    rc, results = argocd(tool, folder)
    assert rc == 1 and any(
        Path(str(r["path"])).name == "suspended.yaml" and r["got"] != r["want"] for r in results
    )


def test_kstatus_reads_every_state_as_documented(tool: Path) -> None:
    paths = [str(HEALTH / "testdata" / name) for name in KSTATUS]
    proc = subprocess.run([str(tool), "kstatus", *paths], capture_output=True, text=True, check=True)
    got = {Path(r["path"]).name: r["status"] for r in map(json.loads, proc.stdout.splitlines())}
    assert got == KSTATUS
