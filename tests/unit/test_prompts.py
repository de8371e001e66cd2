"""Prompt files: TXT, JSONL and CSV, and errors that name the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebatch.api import ImageBatchJobSpec
from imagebatch.errors import PromptFileError, SpecError
from imagebatch.prompts import load_prompts


def spec_for(uri: str, fmt: str | None = None) -> ImageBatchJobSpec:
    src: dict[str, str] = {"uri": uri}
    if fmt:
        src["format"] = fmt
    return ImageBatchJobSpec.model_validate(
        {"model": {"name": "builtin:tiny"}, "promptsFrom": src, "output": {"uri": "/tmp/o"}}
    )


def test_txt_skips_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n")
    assert [p.prompt for p in load_prompts(spec_for(str(f)))] == ["a cat", "a dog"]


def test_jsonl_objects_and_strings(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a cat", "id": "c1", "seed": 5, "negativePrompt": "dog"}\n"a bird"\n')
    ps = load_prompts(spec_for(str(f)))
    assert (ps[0].id, ps[0].seed, ps[0].negative_prompt) == ("c1", 5, "dog")
    assert ps[1].prompt == "a bird"


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": broken}\n')
    with pytest.raises(PromptFileError, match=r"p\.jsonl:3: malformed JSON"):
        load_prompts(spec_for(str(f)))


def test_jsonl_bad_field_names_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": "ok", "sede": 1}\n')
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: sede: unknown field"):
        load_prompts(spec_for(str(f)))


def test_csv_with_header(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text('id,prompt,seed,negative_prompt\nx1,"a cat, sitting",3,\nx2,a dog,,blurry\n')
    ps = load_prompts(spec_for(str(f)))
    assert [(p.id, p.prompt, p.seed, p.negative_prompt) for p in ps] == [
        ("x1", "a cat, sitting", 3, None),
        ("x2", "a dog", None, "blurry"),
    ]


def test_csv_without_prompt_column(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text("text\nhello\n")
    with pytest.raises(PromptFileError, match="'prompt' column"):
        load_prompts(spec_for(str(f)))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(spec_for(str(tmp_path / "nope.txt")))


def test_unreadable_file(tmp_path: Path) -> None:
    d = tmp_path / "dir.txt"
    d.mkdir()  # a directory cannot be read as a file, even by root
    with pytest.raises(PromptFileError, match="cannot read prompt file"):
        load_prompts(spec_for(str(d)))


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_prompts(spec_for(str(f)))


def test_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("\n\n")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        load_prompts(spec_for(str(f)))


def test_unknown_extension_needs_format(tmp_path: Path) -> None:
    f = tmp_path / "prompts.data"
    f.write_text("a cat\n")
    with pytest.raises(PromptFileError, match="set spec.promptsFrom.format"):
        load_prompts(spec_for(str(f)))
    assert len(load_prompts(spec_for(str(f), "txt"))) == 1


def test_configmap_source_needs_cluster() -> None:
    spec = ImageBatchJobSpec.model_validate(
        {
            "model": {"name": "builtin:tiny"},
            "promptsFrom": {"configMapKeyRef": {"name": "p", "key": "prompts.txt"}},
            "output": {"uri": "/tmp/o"},
        }
    )
    with pytest.raises(SpecError, match="needs a cluster"):
        load_prompts(spec)
    assert [p.prompt for p in load_prompts(spec, config_map_reader=lambda n, k: "x\ny\n")] == ["x", "y"]
