"""What ships: the product's wheel and images hold the product only, never the test harness.

The harness (testing/imagebatch_testing) imports pytest and cryptography, which are development
dependencies; it is a package of its own that only `make install` installs.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PRODUCT_DIRS = ("imagebatch", "operator", "worker")
DEV_ONLY = ("pytest", "cryptography", "moto", "imagebatch-testing", "imagebatch_testing")


def _source_tree(dest: Path) -> Path:
    """The files of a fresh clone (tracked and new, not ignored): no stale build/ can leak in."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = _source_tree(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    # The venv's pip, not `python -m pip` (the repository's operator/ would shadow the stdlib's);
    # no build isolation: setuptools comes from the dev extra, so nothing is downloaded.
    pip = Path(sys.executable).parent / "pip"
    subprocess.run(
        [str(pip), "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        cwd=out,
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("imagebatch-*.whl")
    return built


def test_wheel_holds_the_product_and_no_test_infrastructure(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"imagebatch", f"imagebatch-{version('imagebatch')}.dist-info"}, tops
    # The product is there (so the checks below are not vacuous) ...
    for module in ("imagebatch/api.py", "imagebatch/operator/__main__.py", "imagebatch/worker/kube.py"):
        assert module in names
    # ... and nothing that tests or stands in for a cluster.
    harness = [n for n in names if re.search(r"(^|/)(testing|tests?|conftest\.py|test_[^/]*\.py)(/|$)", n)]
    assert harness == []
    for name in ("nodeagent", "pytest_plugin", "certs.py", "kubeapi.py", "pathmap"):
        assert not [n for n in names if name in n], name


def test_wheel_requires_no_development_dependency_without_an_extra(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        meta = whl.read(f"imagebatch-{version('imagebatch')}.dist-info/METADATA").decode()
    plain = [
        line.split(":", 1)[1].strip()
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert plain, meta  # pydantic, PyYAML, fsspec
    for dep in plain:
        name = re.split(r"[\s=<>!~\[;]", dep, maxsplit=1)[0].lower()
        assert name not in DEV_ONLY, dep


def test_product_code_never_imports_the_harness() -> None:
    offenders = []
    for folder in PRODUCT_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [
                    f"{path}: {n}" for n in names if n.split(".")[0] in ("imagebatch_testing", "pytest")
                ]
    assert offenders == []


def test_docker_build_context_leaves_out_the_harness_and_tests() -> None:
    # .dockerignore ignores everything, then lets in only what `pip install .` needs.
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    allowed = sorted(ln[1:].rstrip("/") for ln in lines if ln.startswith("!"))
    assert "*" in lines
    assert allowed == ["README.md", "imagebatch", "operator", "pyproject.toml", "worker"]
    copied = re.findall(r"^COPY\s+(.+?)\s+\S+$", (REPO / "Dockerfile").read_text(), re.M)
    assert not [c for c in copied if "testing" in c or "tests" in c]


def test_one_version_the_package_metadata() -> None:
    """The chart's version and appVersion (its default image tags) follow pyproject's version."""
    chart = yaml.safe_load((REPO / "charts/imagebatch/Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == version("imagebatch"), (
        "bump charts/imagebatch/Chart.yaml's version and appVersion with pyproject.toml's version"
    )
    from imagebatch.operator.builders import DEFAULT_WORKER_IMAGE

    assert DEFAULT_WORKER_IMAGE.endswith(f":{version('imagebatch')}")
