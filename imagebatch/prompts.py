"""Prompt sources: the inline list, or a TXT/JSONL/CSV file on a path or object storage."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

import fsspec
from pydantic import ValidationError

from imagebatch.api import ImageBatchJobSpec, PromptItem
from imagebatch.errors import PromptFileError, SpecError, format_validation_error

FORMATS = ("txt", "jsonl", "csv")
# CSV headers may use snake_case or camelCase; both map onto PromptItem's fields.
_CSV_ALIASES = {"negative_prompt": "negativePrompt", "guidance_scale": "guidanceScale"}


def file_format(uri: str, declared: str | None) -> str:
    if declared:
        return declared
    ext = uri.rsplit(".", 1)[-1].lower() if "." in uri.rsplit("/", 1)[-1] else ""
    if ext in FORMATS:
        return ext
    raise PromptFileError(
        f"spec.promptsFrom.uri: cannot tell the format of {uri!r} from its extension; "
        "name it .txt, .jsonl or .csv, or set spec.promptsFrom.format"
    )


def read_text(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    try:
        with fsspec.open(uri, "rt", encoding="utf-8", **(storage_options or {})) as f:
            text: str = f.read()
            return text
    except FileNotFoundError:
        raise PromptFileError(
            f"spec.promptsFrom.uri: prompt file {uri!r} does not exist; check the path "
            "(relative paths are read from the current directory)"
        ) from None
    except UnicodeDecodeError as e:
        raise PromptFileError(
            f"spec.promptsFrom.uri: {uri!r} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except (OSError, ValueError) as e:
        raise PromptFileError(f"spec.promptsFrom.uri: cannot read prompt file {uri!r}: {e}") from None


def _item(where: str, data: dict[str, Any]) -> PromptItem:
    try:
        return PromptItem.model_validate(data)
    except ValidationError as e:
        raise PromptFileError(f"{where}: {format_validation_error(e)}") from None


def parse_txt(text: str, where: str) -> list[PromptItem]:
    return [
        _item(f"{where}:{n}", {"prompt": line.strip()})
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]


def parse_jsonl(text: str, where: str) -> list[PromptItem]:
    out: list[PromptItem] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(
                f"{where}:{n}: malformed JSON ({e.msg} at column {e.colno}); each line must be one JSON "
                'object such as {"prompt": "a red bicycle"} or a JSON string'
            ) from None
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict):
            raise PromptFileError(f"{where}:{n}: expected a JSON object or string, got {type(obj).__name__}")
        out.append(_item(f"{where}:{n}", obj))
    return out


def parse_csv(text: str, where: str) -> list[PromptItem]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
        raise PromptFileError(
            f"{where}:1: the CSV header must have a 'prompt' column (found {reader.fieldnames})"
        )
    out: list[PromptItem] = []
    for row in reader:
        data: dict[str, Any] = {
            _CSV_ALIASES.get(k, k): v for k, v in row.items() if k and v not in (None, "")
        }
        out.append(_item(f"{where}:{reader.line_num}", data))
    return out


PARSERS: dict[str, Callable[[str, str], list[PromptItem]]] = {
    "txt": parse_txt,
    "jsonl": parse_jsonl,
    "csv": parse_csv,
}


def parse_prompts(text: str, fmt: str, where: str) -> list[PromptItem]:
    prompts = PARSERS[fmt](text, where)
    if not prompts:
        raise PromptFileError(f"{where}: the prompt file holds no prompts; add at least one")
    return prompts


def load_prompts(
    spec: ImageBatchJobSpec,
    storage_options: dict[str, Any] | None = None,
    config_map_reader: Callable[[str, str], str] | None = None,
) -> list[PromptItem]:
    """All prompts of a job, in order. A ConfigMap source needs a reader (cluster mode)."""
    if spec.prompts is not None:
        return [PromptItem(prompt=p) if isinstance(p, str) else p for p in spec.prompts]
    src = spec.prompts_from
    assert src is not None  # the spec's validator guarantees one source
    if src.config_map_key_ref is not None:
        ref = src.config_map_key_ref
        if config_map_reader is None:
            raise SpecError(
                "spec.promptsFrom.configMapKeyRef needs a cluster; for a local run use spec.promptsFrom.uri"
            )
        fmt = src.format or file_format(ref.key, None)
        return parse_prompts(config_map_reader(ref.name, ref.key), fmt, f"configmap {ref.name}/{ref.key}")
    assert src.uri is not None
    fmt = file_format(src.uri, src.format)
    return parse_prompts(read_text(src.uri, storage_options), fmt, src.uri)
