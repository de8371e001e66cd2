#!/usr/bin/env bash
# mypy --strict over the product's import root and the test harness's. The folders operator/ and
# worker/ are installed as imagebatch.operator and imagebatch.worker (pyproject's package-dir),
# which mypy cannot follow through setuptools' editable import hook; a tree of links gives it the
# installed layout.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck
rm -rf "$tree" && mkdir -p "$tree/imagebatch"
for f in imagebatch/*; do ln -s "$PWD/$f" "$tree/imagebatch/"; done
ln -s "$PWD/operator" "$tree/imagebatch/operator"
ln -s "$PWD/worker" "$tree/imagebatch/worker"
# The test harness, a development-only package of its own (testing/pyproject.toml).
ln -s "$PWD/testing/imagebatch_testing" "$tree/imagebatch_testing"
MYPYPATH="$tree" exec "${PYTHON:-.venv/bin/python}" -m mypy -p imagebatch -p imagebatch_testing "$@"
