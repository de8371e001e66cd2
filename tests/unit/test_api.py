"""The manifest contract: what a user gets back for good and bad ImageBatchJob manifests."""

from __future__ import annotations

from typing import Any

import pytest

from imagebatch.errors import SpecError
from imagebatch.jobfile import load_job, parse_job


def job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"name": "builtin:tiny"},
        "prompts": ["a cat"],
        "output": {"uri": "/tmp/out"},
    }
    base.update(spec)
    return {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatchJob",
        "metadata": {"name": "j"},
        "spec": base,
    }


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as e:
        parse_job(data)
    return str(e.value)


def test_defaults_and_camel_case() -> None:
    j = parse_job(job(generation={"guidanceScale": 3.0, "imagesPerPrompt": 2}))
    assert j.spec.generation.guidance_scale == 3.0
    assert j.spec.generation.images_per_prompt == 2
    assert j.spec.generation.width == 512
    assert j.spec.batching.batch_size == "auto"
    assert j.spec.retries.max_attempts == 3


def test_unknown_field_is_named() -> None:
    msg = error_of(job(generaton={"steps": 4}))
    assert "spec.generaton: unknown field" in msg


def test_nested_unknown_field_is_named() -> None:
    assert "spec.generation.stepz: unknown field" in error_of(job(generation={"stepz": 4}))


def test_width_not_multiple_of_8() -> None:
    msg = error_of(job(generation={"width": 500}))
    assert "spec.generation.width" in msg
    assert "multiple of 8" in msg
    assert "496" in msg  # says what to change it to


def test_steps_below_one() -> None:
    msg = error_of(job(generation={"steps": 0}))
    assert "spec.generation.steps" in msg
    assert "greater than or equal to 1" in msg


def test_empty_prompt_list() -> None:
    assert "spec.prompts is empty" in error_of(job(prompts=[]))


def test_empty_prompt_string() -> None:
    assert "spec.prompts.1" in error_of(job(prompts=["ok", ""]))


def test_no_prompt_source() -> None:
    data = job()
    del data["spec"]["prompts"]
    assert "set spec.prompts" in error_of(data)


def test_both_prompt_sources() -> None:
    assert "or spec.promptsFrom, not both" in error_of(job(promptsFrom={"uri": "p.txt"}))


def test_bad_item_id() -> None:
    assert "must start with a letter or digit" in error_of(job(promptItems=[{"id": "../x", "prompt": "p"}]))


def test_batch_size_bounds() -> None:
    assert "spec.batching.batchSize" in error_of(job(batching={"batchSize": 0}))
    assert parse_job(job(batching={"batchSize": 16})).spec.batching.batch_size == 16


def test_min_replicas_above_max() -> None:
    assert "minReplicas (5) must not exceed maxReplicas (2)" in error_of(
        job(workers={"minReplicas": 5, "maxReplicas": 2})
    )


def test_wrong_kind() -> None:
    data = job()
    data["kind"] = "Job"
    assert "kind" in error_of(data)


def test_load_job_yaml_errors(tmp_path: Any) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: imagebatch.dev/v1alpha1\nkind: ImageBatchJob\nspec: [\n")
    with pytest.raises(SpecError, match=r"bad.yaml:\d+: not valid YAML"):
        load_job(bad)
    with pytest.raises(SpecError, match="no such file"):
        load_job(tmp_path / "missing.yaml")


def test_per_prompt_overrides_are_checked_like_the_defaults() -> None:
    msg = error_of(job(promptItems=[{"prompt": "ok"}, {"prompt": "x", "width": 100, "steps": 0}]))
    assert "spec.promptItems.1.width: must be a multiple of 8 (got 100; try 96)" in msg
    assert "spec.promptItems.1.steps" in msg


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("JOB_UID", True),
        ("POD_NAME", True),
        ("HF_HUB_OFFLINE", True),
        ("IMAGEBATCH_GPUS", True),
        ("IMAGEBATCH_ACCESS_POLICY", True),
        ("KUBERNETES_SERVICE_HOST", True),
        ("AWS_ENDPOINT_URL_S3", True),
        ("IMAGEBATCH_FAILPOINTS", False),  # the job's own worker only: how fault tests reach it
        ("OMP_NUM_THREADS", False),
        ("HF_HOME", False),
    ],
)
def test_worker_env_names_the_operator_owns_are_refused(name: str, refused: bool) -> None:
    doc = job(workers={"env": [{"name": name, "value": "x"}]})
    if refused:
        assert f"spec.workers.env: {name} is set by the operator" in error_of(doc)
    else:
        parse_job(doc)
