"""Loading from a hub: a fake one (tests/worker/fakehub.py) that rate-limits the first requests.

Each load runs in a fresh process, as in a worker pod: huggingface_hub reads HF_ENDPOINT,
HF_HOME and HF_HUB_OFFLINE when it is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagebatch_testing.fakehub import FakeHub

REPO = "test-org/tiny-sd"

# Short backoff for the test; the schedule's shape (jittered, growing) is the production one.
PRELUDE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from imagebatch.worker import pipeline
pipeline.HUB_WAIT_FIRST = 0.01
from imagebatch.api import ModelSpec
"""
LOAD = (
    PRELUDE
    + """
import torch
loaded = pipeline.load_pipeline(ModelSpec(name=sys.argv[1]), "cpu")
out = loaded.pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(1))
print(json.dumps({"pipeline": loaded.pipeline_class, "shape": list(out.images.shape)}))
"""
)
FETCH = PRELUDE + "from imagebatch.cli import main\nsys.exit(main(['fetch-model', '--model', sys.argv[1]]))\n"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Imported here, not at collection: huggingface_hub reads HF_HUB_OFFLINE when first imported,
    # and the other tests of the session rely on the offline setting of tests/conftest.py.
    from imagebatch.worker.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("hub") / "repo"
    build_tiny_pipeline().save_pretrained(str(folder))
    return folder


def run(
    code: str, repo: str, hf_home: Path, endpoint: str, offline: bool
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    return subprocess.run(
        [sys.executable, "-c", code, repo], env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_rate_limited_hub_is_retried_not_failed(model_folder: Path, tmp_path: Path) -> None:
    hub = FakeHub(REPO, model_folder, fail_first=2)
    with hub.running():
        r = run(LOAD, REPO, tmp_path / "hf", hub.url, offline=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"pipeline": "StableDiffusionPipeline"' in r.stdout
    assert [q for q in hub.requests if q[2] == 429] and len([q for q in hub.requests if q[2] == 429]) == 2
    assert "ModelLoadError" not in r.stderr
    assert "transient hub error" in r.stderr


def test_fetch_step_fills_the_cache_then_workers_run_offline(model_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hf-cache"  # the spec.model.cache volume, as the fetch init container sees it
    hub = FakeHub(REPO, model_folder, fail_first=2)
    with hub.running():
        fetched = run(FETCH, REPO, cache, hub.url, offline=False)
        url = hub.url
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    assert len([q for q in hub.requests if q[2] == 429]) == 2
    # The hub is gone now (nothing listens at its address): a worker reads the cache offline.
    worker = run(LOAD, REPO, cache, url, offline=True)
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert '"shape": [1, 32, 32, 3]' in worker.stdout
    # The fetch step of the next pod finds the model with no hub request at all.
    again = run(FETCH, REPO, cache, url, offline=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "in the cache already" in again.stderr


def test_a_missing_model_fails_the_fetch_with_a_model_error(model_folder: Path, tmp_path: Path) -> None:
    hub = FakeHub(REPO, model_folder)
    with hub.running():
        r = run(FETCH, "test-org/no-such-model", tmp_path / "hf", hub.url, offline=False)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "spec.model.name: cannot fetch model 'test-org/no-such-model'" in r.stderr
    assert "transient hub error" not in r.stderr


def test_transient_errors_are_found_through_diffusers_wrapping() -> None:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    from imagebatch.worker.pipeline import is_transient

    def wrapped(status: int) -> OSError:
        response = httpx.Response(status, request=httpx.Request("GET", "http://hub/api/models/x"))
        try:
            try:
                raise HfHubHTTPError("hub says no", response=response)
            except HfHubHTTPError as e:
                raise OSError("Cannot load model x") from e
        except OSError as outer:
            return outer

    assert is_transient(wrapped(429)) and is_transient(wrapped(503))
    assert not is_transient(wrapped(404)) and not is_transient(wrapped(401))
    assert is_transient(OSError("x").with_traceback(None)) is False
    assert is_transient(httpx.ConnectTimeout("slow"))
    from huggingface_hub.errors import OfflineModeIsEnabled

    assert not is_transient(OfflineModeIsEnabled("offline mode is enabled"))
