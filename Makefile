# Every target does its own set-up from a fresh clone: a virtual environment in .venv with the
# pinned dependencies, and (for the cluster) Kubernetes binaries built from Go modules and cached
# outside the repository (~/.cache/imagebatch), so only a fresh machine pays the build.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml testing/pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
# The one version: pyproject.toml's (the package metadata). Image tags and the chart follow it.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)
IMAGE_REPO ?= ghcr.io/imagebatch

.DEFAULT_GOAL := help

.PHONY: help install demo test lint typecheck unit worker-tests cluster-tests e2e-tests bench bench-ray crds cluster-bins \
	cluster-up cluster-down pre-commit version images clean

# pip runs as $(VENV)/bin/pip, never `python -m pip`: with the repository root on sys.path, the
# folder operator/ would shadow the standard library's `operator` before the install exists.
# The test harness (testing/, import root imagebatch_testing) is a development-only package of its
# own, installed in the same pip run so the dev extra's pins hold for its dependencies.
$(STAMP): pyproject.toml testing/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade "pip==25.3"
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[worker,operator,dev]' -e ./testing
	rm -f $(VENV)/.installed-* && touch $@

## help: every target with its one-line purpose (this list)
help:
	@awk '/^## [a-z0-9-]+: / { sub(/^## /, ""); name = $$0; sub(/:.*/, "", name); text = $$0; \
		sub(/^[a-z0-9-]+: /, "", text); printf "  %-15s %s\n", name, text }' $(firstword $(MAKEFILE_LIST))

## install: .venv with the worker, operator and dev extras and the test harness (testing/), editable
install: $(STAMP)

## demo: the quick-start job on the built-in tiny model; images and index.html in out/quickstart/
demo: install
	$(VENV)/bin/imagebatch run examples/quickstart.yaml
	@echo "open out/quickstart/index.html"

## test: every test: lint, types, unit, worker (CPU), cluster and e2e (a real control plane), bench smoke
test: install cluster-bins lint typecheck
	$(VENV)/bin/pytest -ra --durations=15 $(PYTEST_ARGS)

## lint: ruff check, ruff format --check, and the import contracts (lint-imports: hack/importlint.sh)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	bash hack/importlint.sh

## typecheck: mypy --strict over imagebatch and the test harness (hack/typecheck.sh)
typecheck: install
	bash hack/typecheck.sh

## unit: the unit layer, tests/unit (no cluster; the chart tests need helm: cluster-bins)
unit: install cluster-bins
	$(VENV)/bin/pytest -q tests/unit $(PYTEST_ARGS)

## worker-tests: the worker layer, tests/worker: the engine and local mode on the CPU
worker-tests: install
	$(VENV)/bin/pytest -q tests/worker $(PYTEST_ARGS)

## cluster-tests: every test marked cluster (tests/cluster and tests/e2e), on a local control plane
cluster-tests: install cluster-bins
	$(VENV)/bin/pytest -q -m cluster $(PYTEST_ARGS)

## e2e-tests: the end-to-end layer only, tests/e2e: operator and workers on a local control plane
e2e-tests: install cluster-bins
	$(VENV)/bin/pytest -q tests/e2e $(PYTEST_ARGS)

## bench: the engine against plain diffusers on this machine (--arch tiny on a CPU); prints both ratios
bench: install
	$(PY) benchmarks/engine.py --arch tiny

## bench-ray: imagebatch run against Ray Data on builtin:tiny (Ray in $(RAY_VENV): see benchmarks/peer_ray.py)
RAY_VENV ?= /work/ray-venv
bench-ray: install
	RAY_VENV=$(RAY_VENV) $(PY) benchmarks/peer_ray.py

## crds: regenerate crds/ and the chart's CRDs from imagebatch/api.py
crds: install
	$(PY) -m imagebatch.crd

## cluster-bins: build (or find cached) etcd, kube-*, kubectl, helm, Kueue and hack/gitops from Go modules
cluster-bins:
	bash hack/cluster/build.sh >/dev/null
	bash hack/kueue/build.sh >/dev/null
	bash hack/gitops/build.sh >/dev/null

## cluster-up: a local control plane and node agent in the background; prints the KUBECONFIG line
cluster-up: install cluster-bins
	$(PY) -m imagebatch_testing.cluster up

## cluster-down: stop exactly what cluster-up started
cluster-down: install
	$(PY) -m imagebatch_testing.cluster down

## pre-commit: the pre-commit hooks on every file (ruff, ruff-format, mypy, import contracts, CRD staleness)
pre-commit: install
	$(VENV)/bin/pre-commit run --all-files

## version: print the version (pyproject.toml), which tags the images and the chart
version:
	@echo $(VERSION)

## images: docker build both images, tagged with the version (needs docker)
images:
	docker build --target operator --build-arg VERSION=$(VERSION) -t $(IMAGE_REPO)/imagebatch-operator:$(VERSION) .
	docker build --target worker --build-arg VERSION=$(VERSION) -t $(IMAGE_REPO)/imagebatch-worker:$(VERSION) .

## clean: remove outputs and tool caches (not .venv, not the cached cluster binaries)
clean:
	rm -rf out build .pytest_cache .mypy_cache .ruff_cache
