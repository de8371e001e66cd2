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

.PHONY: install demo test lint typecheck unit worker-tests cluster-tests bench crds cluster-bins cluster-up cluster-down clean

# pip runs as $(VENV)/bin/pip, never `python -m pip`: with the repository root on sys.path, the
# folder operator/ would shadow the standard library's `operator` before the install exists.
# The test harness (testing/, import root imagebatch_testing) is a development-only package of its
# own, installed in the same pip run so the dev extra's pins hold for its dependencies.
$(STAMP): pyproject.toml testing/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade "pip==25.3"
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[worker,operator,dev]' -e ./testing
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

## demo: the quick-start job on the built-in tiny model; images and index.html in out/quickstart/
demo: install
	$(VENV)/bin/imagebatch run examples/quickstart.yaml
	@echo "open out/quickstart/index.html"

## test: every test: lint, types, unit, worker (CPU), cluster (a real control plane), benchmark smoke
test: install cluster-bins lint typecheck
	$(VENV)/bin/pytest -ra --durations=15 $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	bash hack/typecheck.sh

unit: install
	$(VENV)/bin/pytest -q tests/unit $(PYTEST_ARGS)

worker-tests: install
	$(VENV)/bin/pytest -q tests/worker $(PYTEST_ARGS)

cluster-tests: install cluster-bins
	$(VENV)/bin/pytest -q -m cluster $(PYTEST_ARGS)

## bench: the engine against plain diffusers on this machine (--arch tiny on a CPU)
bench: install
	$(PY) benchmarks/engine.py --arch tiny

crds: install
	$(PY) -m imagebatch.crd

cluster-bins:
	bash hack/cluster/build.sh >/dev/null

## cluster-up: a local control plane and node agent in the background; prints the KUBECONFIG line
cluster-up: install cluster-bins
	$(PY) -m imagebatch_testing.cluster up

cluster-down:
	$(PY) -m imagebatch_testing.cluster down

clean:
	rm -rf out build .pytest_cache .mypy_cache .ruff_cache
