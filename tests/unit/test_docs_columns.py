"""The column names that the docs and the chart's NOTES show for `kubectl get ibj` / `ibs` are the
CRDs' printer columns (those `kubectl get` prints without `-o wide`), in their order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "docs/chart.md", "docs/operator.md", "charts/imagebatch/templates/NOTES.txt"]
# `kubectl get ibj ... # NAME STATE ...` (spaces or commas between the names; NAME optional).
LINE = re.compile(r"kubectl get (ibj|ibs)\b[^#\n]*#\s*(.*)$", re.M)


def columns(kind: str) -> list[str]:
    plural = {"ibj": "imagebatchjobs", "ibs": "imagebatchshards"}[kind]
    crd = yaml.safe_load((REPO / f"crds/imagebatch.dev_{plural}.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    cols = version["additionalPrinterColumns"]
    return ["NAME", *(c["name"].upper() for c in cols if not c.get("priority"))]


def claimed(comment: str) -> list[str] | None:
    """The column names a comment lists, or None when it is prose (`the shards: state, ...`)."""
    head = comment.rsplit(":", 1)[-1]  # `# the shards: JOB STATE ...`
    words = [w for w in re.split(r"[\s,]+", head.strip()) if w]
    if len(words) < 3 or not all(re.fullmatch(r"[A-Z][A-Z/]*", w) for w in words):
        return None
    return words


def documented() -> list[tuple[str, str, list[str]]]:
    found = []
    for name in DOCS:
        for match in LINE.finditer((REPO / name).read_text()):
            words = claimed(match.group(2))
            if words is not None:
                found.append((name, match.group(1), words))
    return found


def test_the_docs_show_column_lines() -> None:
    files = {name for name, kind, _ in documented() if kind == "ibj"}
    assert files == set(DOCS), f"a `kubectl get ibj  # NAME STATE ...` line is missing in {set(DOCS) - files}"


@pytest.mark.parametrize(("name", "kind", "words"), documented())
def test_documented_columns_are_the_crds(name: str, kind: str, words: list[str]) -> None:
    want = columns(kind)
    if words[0] != "NAME":
        want = want[1:]
    assert words == want, (
        f"{name}: `kubectl get {kind}` shows {' '.join(want)}, the docs say {' '.join(words)}"
    )
