#!/usr/bin/env bash
# import-linter over the installed layout. The folders operator/ and worker/ are installed as
# imagebatch.operator and imagebatch.worker (pyproject's package-dir), which grimp cannot see
# through setuptools' editable import hook, so it reads a tree that has that layout: real
# folders, files linked. It runs from inside that tree: import-linter puts the working directory
# on sys.path, and the repository root would offer imagebatch/ without its two subpackages (and an
# operator/ that shadows the standard library's).
# CONFIG (default pyproject.toml) and SRC (default this repository) let a test lint another tree.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
src=$(cd "${SRC:-$root}" && pwd)
config=$(cd "$(dirname "${CONFIG:-$src/pyproject.toml}")" && pwd)/$(basename "${CONFIG:-pyproject.toml}")
tree=${TREE:-$src/build/importlint}
rm -rf "$tree" && mkdir -p "$tree"
link_package() {  # link_package FROM TO: every .py file of FROM (recursively) linked under TO
  (cd "$1" && find . -name '*.py' -not -path '*/__pycache__/*') | while read -r f; do
    mkdir -p "$2/$(dirname "$f")" && ln -s "$1/$f" "$2/$f"
  done
}
link_package "$src/imagebatch" "$tree/imagebatch"
link_package "$src/operator" "$tree/imagebatch/operator"
link_package "$src/worker" "$tree/imagebatch/worker"
cd "$tree"
PYTHONPATH="$tree" exec "${LINT_IMPORTS:-$root/.venv/bin/lint-imports}" --config "$config" --no-cache "$@"
