"""Fixtures shared by every test layer. Cluster fixtures live here so one session runs one cluster."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebatch_testing.pytest_plugin import kube_cluster, kueue
from imagebatch_testing.s3 import S3Server, s3_server

__all__ = ["kube_cluster", "kueue", "s3"]

REPO = Path(__file__).resolve().parent.parent
# No test may reach a model hub. Set before anything imports huggingface_hub, which reads it once
# at import: session fixtures (the tiny pipeline) import it before any function-scoped fixture.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 API (moto's server) on 127.0.0.1 for the whole session."""
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with s3_server(str(log)) as server:
        yield server


@pytest.fixture(autouse=True)
def _test_node_access(monkeypatch: pytest.MonkeyPatch) -> None:
    # Workers built in-process here read and write plain local folders (the test node cannot
    # mount volumes) and the session's S3 server: what the chart's worker.access would allow with
    # localPaths=any and s3Endpoints=["*"]. Worker pods get the operator's policy instead, and
    # tests/unit/test_access.py removes this to test the defaults.
    from imagebatch.access import ENV_VAR, AccessPolicy

    monkeypatch.setenv(ENV_VAR, AccessPolicy(local_paths="any", s3_endpoints=frozenset({"*"})).to_env())


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # No test may reach a model hub: loading must fail fast and say so.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
