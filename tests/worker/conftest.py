"""Worker tests run the real engine on the CPU with the built-in tiny pipeline."""

from __future__ import annotations

import pytest

from imagebatch.api import ModelSpec
from imagebatch.worker.pipeline import LoadedPipeline, load_pipeline


@pytest.fixture(scope="session")
def tiny() -> LoadedPipeline:
    return load_pipeline(ModelSpec(name="builtin:tiny"), "cpu")
