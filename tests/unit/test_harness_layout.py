"""The test harness stays easy to change: small modules named after what they own, short functions.

Limits for testing/imagebatch_testing (the product is not held to these numbers here).
"""

from __future__ import annotations

import ast
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "testing" / "imagebatch_testing"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    found = sorted(HARNESS.glob("*.py"))
    assert len(found) > 5, f"no harness under {HARNESS}"  # a moved harness must not pass vacuously
    return found


def test_no_harness_module_is_longer_than_400_lines() -> None:
    long = {p.name: n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"split these by what they own: {long}"


def test_no_harness_function_is_longer_than_60_lines() -> None:
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.name}:{node.lineno} {node.name}"] = lines
    assert long == {}, f"split these into named steps: {long}"
