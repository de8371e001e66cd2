#!/usr/bin/env bash
# The GPU checks of the engine, in one command that ends in about 6 minutes on an H100/H200.
# Run from the repository root on a machine with CUDA torch and transformers. Where diffusers or
# imagebatch are not installed, carry them as wheels in .whl/ (made by hack/gpu-wheels.sh).
# Writes JSON lines to ${OUT:-benchmarks/results/local}; prints them too.
set -euo pipefail
out="${OUT:-benchmarks/results/local}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" || true
python3 -c 'import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)' >>"$out/gpu.txt"
# Throughput: single-prompt loop, plain batched call, engine writing PNGs; best of 2 interleaved rounds.
python3 benchmarks/engine.py --arch sd15 --images 128 --batch 64 --single-images 8 --repeats 2 --fast | tee "$out/sd15.jsonl"
python3 benchmarks/engine.py --arch sdxl --images 32 --batch 16 --single-images 4 --repeats 2 --fast | tee "$out/sdxl.jsonl"
# Time to the first stored image with a compile cache: cold, then warm (a restarted worker).
if [[ "${FIRST_IMAGE:-1}" == 1 ]]; then
    cache="$(mktemp -d)"
    python3 benchmarks/first_image.py --arch sd15 --batch 16 --cache "$cache" | tee -a "$out/first-image.jsonl"
    python3 benchmarks/first_image.py --arch sd15 --batch 16 --cache "$cache" | tee -a "$out/first-image.jsonl"
fi
