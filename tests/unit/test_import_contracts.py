"""The import-linter contracts (pyproject.toml) hold, and break when a worker module imports the
operator or a shared module imports either side: `make lint` runs the same hack/importlint.sh."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def lint_imports(src: Path, tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SRC": str(src), "TREE": str(tree)}
    return subprocess.run(
        ["bash", str(REPO / "hack/importlint.sh")], capture_output=True, text=True, env=env, cwd=REPO
    )


def copy_of_sources(dest: Path) -> Path:
    for folder in ("imagebatch", "operator", "worker"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_contracts_hold_on_this_tree(tmp_path: Path) -> None:
    out = lint_imports(REPO, tmp_path / "tree")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 kept, 0 broken" in out.stdout, out.stdout
    # The graph has both sides: a tree without them would keep every contract vacuously.
    assert "the operator and the worker are independent KEPT" in out.stdout


@pytest.mark.parametrize(
    ("module", "bad_import", "broken"),
    [
        (
            "worker/claims.py",
            "import imagebatch.operator.leases",
            "imagebatch.worker.claims -> imagebatch.operator",
        ),
        (
            "operator/progress.py",
            "from imagebatch.worker import claims",
            "imagebatch.operator.progress -> imagebatch.worker",
        ),
        ("imagebatch/names.py", "import imagebatch.operator.kube", "imagebatch.names -> imagebatch.operator"),
        (
            "imagebatch/shardstate.py",
            "from imagebatch.worker import kube",
            "imagebatch.shardstate -> imagebatch.worker",
        ),
        # the decision is pure: no API client, no storage, not even through another module
        (
            "operator/workers.py",
            "from imagebatch.operator import kube",
            "imagebatch.operator.workers -> imagebatch.operator.kube",
        ),
        ("operator/lifecycle.py", "import imagebatch.manifest", "imagebatch.manifest -> imagebatch.storage"),
        ("operator/status.py", "import kubernetes.client", "imagebatch.operator.status -> kubernetes"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    tmp_path: Path, module: str, bad_import: str, broken: str
) -> None:
    src = copy_of_sources(tmp_path / "src")
    with (src / module).open("a") as f:
        f.write(f"\n{bad_import}  # the deliberate violation\n")
    out = lint_imports(src, tmp_path / "tree")
    assert out.returncode != 0, out.stdout
    assert " 0 broken" not in out.stdout and broken in out.stdout, out.stdout


def test_every_shared_module_is_under_the_contract() -> None:
    """A new module in imagebatch/ is shared (held to the contract) unless it is the CLI, which
    wires both sides; listing it is what keeps it honest."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    shared = next(c for c in config["contracts"] if c["id"] == "shared")
    modules = {f"imagebatch.{p.stem}" for p in (REPO / "imagebatch").glob("*.py") if p.stem != "__init__"}
    assert set(shared["source_modules"]) == modules - {"imagebatch.cli"}
