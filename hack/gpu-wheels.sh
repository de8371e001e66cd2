#!/usr/bin/env bash
# Wheels for a GPU machine that has CUDA torch and transformers but not diffusers or imagebatch:
# puts imagebatch and diffusers (pure Python) into .whl/, which git ignores and the device tool
# can carry. Then, there: bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
.venv/bin/python -m pip wheel -q --no-deps -w .whl .
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .whl "diffusers==0.42.1"
ls -la .whl
