"""A job's fingerprint: a digest of everything that decides its stored images' bytes.

Stored images are never remade, so an output made with other settings is refused (job.json holds
the fingerprint; worker/jobrecord.py and local mode compare it). Apart from planning, which is
pure: the layout's entry comes from the layouts, which know storage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from imagebatch.api import ImageBatchJobSpec
from imagebatch.layouts import layout_for
from imagebatch.planning import Item


def fingerprint(spec_fields: dict[str, Any], items: Sequence[Item]) -> str:
    """A digest of everything that decides the stored images' bytes.

    Stored images are skipped on a re-run, so a run must not reuse an output that was made
    with other settings: the fingerprint is stored beside the images and compared.
    """
    h = hashlib.sha256(json.dumps(spec_fields, sort_keys=True, default=str).encode())
    for it in items:
        h.update(json.dumps(asdict(it), sort_keys=True).encode())
    return h.hexdigest()


def _model_fields(spec: ImageBatchJobSpec) -> dict[str, Any]:
    # Where the weights are cached and the token that fetches them do not change an image; a
    # variant does (fp16 weights), and enters only when set so that older outputs still match.
    fields = spec.model.model_dump(exclude={"cache", "token_secret_ref", "variant"})
    if spec.model.variant is not None:
        fields["variant"] = spec.model.variant
    return fields


def image_fields(spec: ImageBatchJobSpec) -> dict[str, Any]:
    """The spec fields that change finished images (the prompts enter through the items)."""
    return {
        "model": _model_fields(spec),
        "generation": spec.generation.model_dump(),
        "format": spec.output.format,
        "quality": spec.output.quality,
        **layout_for(spec.output.layout).fingerprint_entry(),
    }
