"""Reading an ImageBatchJob manifest from a YAML file, with errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from imagebatch.api import ImageBatchJob
from imagebatch.errors import SpecError, format_validation_error


def parse_job(data: Any, where: str = "manifest") -> ImageBatchJob:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a YAML mapping with apiVersion, kind, metadata and spec")
    try:
        return ImageBatchJob.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{where}: invalid ImageBatchJob\n{format_validation_error(e)}") from None


def load_job(path: str | Path) -> ImageBatchJob:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise SpecError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "ImageBatchJob"]
    if len(jobs) != 1:
        raise SpecError(f"{path}: expected exactly one ImageBatchJob document, found {len(jobs)}")
    return parse_job(jobs[0], str(path))
