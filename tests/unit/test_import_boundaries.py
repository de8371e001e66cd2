"""The operator never imports torch; the worker never imports kopf (design, section 8)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (["imagebatch.operator.__main__", "imagebatch.operator.handlers"], ["torch", "diffusers"]),
        (["imagebatch.worker.cluster", "imagebatch.worker.kube"], ["kopf"]),
    ],
)
def test_import_boundary(modules: list[str], forbidden: list[str]) -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"print([m for m in {forbidden!r} if m in sys.modules])"
    )
    # -P: the repository's operator/ folder must not shadow the standard library's operator.
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
