"""The output layouts' registry, and fingerprints that outputs made before it still match."""

from __future__ import annotations

from typing import get_args

import pytest

from imagebatch.api import ImageBatchJob, Output
from imagebatch.errors import SpecError
from imagebatch.fingerprint import fingerprint, image_fields
from imagebatch.layouts import LAYOUTS, FilesLayout, WebdatasetLayout, layout_for
from imagebatch.planning import expand_items
from imagebatch.prompts import iter_prompts
from imagebatch.worker.jobrecord import settings_digest

# What the code before imagebatch/layouts.py computed for these jobs (job.json holds them: a
# changed digest would refuse to resume every output made before).
BEFORE = {
    "files": (
        "45ce9323bd4e8ce446741e29d7dcf556c4145ff3ae10e8974baae08ec6b724d6",
        "151c6d0cdae34e57f5b80df81ce859d9b41c124993554a0de4485482669492e5",
    ),
    "webdataset": (
        "1dbadb00de11b78b476e18f89e4d038e510289fe5345e84f916e6f1ac44f729e",
        "f2ea21dfe79d96fcfcc88112f56d8f3233268978270eea0896c86fbd7ab65d42",
    ),
}


def job(layout: str) -> ImageBatchJob:
    return ImageBatchJob.model_validate(
        {
            "apiVersion": "imagebatch.dev/v1alpha1",
            "kind": "ImageBatchJob",
            "metadata": {"name": "t"},
            "spec": {
                "model": {"name": "builtin:tiny"},
                "prompts": ["a red fox", "a blue whale"],
                "generation": {"width": 32, "height": 32, "steps": 2, "seed": 5},
                "output": {"uri": "/tmp/x", "layout": layout, "format": "webp"},
            },
        }
    )


@pytest.mark.parametrize("layout", sorted(BEFORE))
def test_fingerprints_of_the_built_in_layouts_did_not_change(layout: str) -> None:
    spec = job(layout).spec
    items = expand_items(iter_prompts(spec, {}), spec.generation)
    assert (fingerprint(image_fields(spec), items), settings_digest(spec)) == BEFORE[layout]


def test_the_api_admits_exactly_the_built_in_layouts() -> None:
    assert set(get_args(Output.model_fields["layout"].annotation)) == set(LAYOUTS)
    assert isinstance(layout_for("files"), FilesLayout)
    assert isinstance(layout_for("webdataset"), WebdatasetLayout)
    assert layout_for(LAYOUTS["files"]) is LAYOUTS["files"]


def test_an_unknown_layout_is_a_spec_error_that_does_not_echo_it() -> None:
    with pytest.raises(SpecError) as e:
        layout_for("<script>")
    assert "<script>" not in str(e.value) and "files" in str(e.value)
