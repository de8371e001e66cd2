"""Prompt preparation ahead of denoising, the negative-prompt cache, truncation, and the stop flag
checked between denoising steps; all on the real tiny pipeline on the CPU."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imagebatch.api import Generation, PromptItem
from imagebatch.planning import Item, expand_items
from imagebatch.storage import Storage
from imagebatch.worker.engine import BatchAbandonedError, Engine, EngineOptions
from imagebatch.worker.pipeline import LoadedPipeline
from imagebatch.worker.shards import process_shard

GEN = Generation(width=32, height=32, steps=2, guidance_scale=5.0, seed=11)


def with_negatives(n: int, distinct: int, gen: Generation = GEN) -> list[Item]:
    return expand_items(
        [PromptItem(prompt=f"object {i}", negative_prompt=f"blurry {i % distinct}") for i in range(n)], gen
    )


@contextmanager
def count_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    """Counts forward calls of a module (the real text encoder / UNet, not the engine's stats)."""
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    handle = module.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_each_negative_prompt_is_encoded_once(tiny: LoadedPipeline, tmp_path: Path) -> None:
    its = with_negatives(40, distinct=5)
    with (
        count_calls(tiny.pipe.text_encoder) as calls,
        Engine(tiny, Storage(str(tmp_path)), EngineOptions(batch_size=8)) as eng,
    ):
        eng.run(its)
        # A second run of other prompts with the same negatives: the cache spans runs (shards).
        more = with_negatives(16, distinct=5, gen=GEN.model_copy(update={"seed": 12}))
        eng.storage = Storage(str(tmp_path / "again"))
        eng.run(more)
    # One call per batch of prompts (5 + 2) plus one per distinct negative prompt (5), not 2 per batch.
    assert calls[0] == 5 + 2 + 5
    assert eng.text.stats.encoder_calls == calls[0]
    assert eng.text.stats.negative_hits == 40 + 16 - 5


def test_prepared_embeddings_give_the_pipelines_own_images(tiny: LoadedPipeline, tmp_path: Path) -> None:
    its = with_negatives(6, distinct=2)
    with Engine(tiny, Storage(str(tmp_path)), EngineOptions(batch_size=6)) as eng:
        ours = eng.generate(its).numpy().astype(int)
    with torch.inference_mode():
        theirs = tiny.pipe(
            prompt=[it.prompt for it in its],
            negative_prompt=[it.negative_prompt for it in its],
            num_inference_steps=GEN.steps,
            guidance_scale=GEN.guidance_scale,
            height=32,
            width=32,
            generator=[torch.Generator("cpu").manual_seed(it.seed) for it in its],
            output_type="np",
        ).images
    theirs = (theirs * 255).round().clip(0, 255).astype(int)
    assert np.abs(ours - theirs).max() <= 2
    # The negative prompt really changes the images (the comparison is not vacuous).
    with Engine(tiny, Storage(str(tmp_path)), EngineOptions(batch_size=6)) as eng:
        other = [Item(**{**it.to_dict(), "negative_prompt": "sharp"}) for it in its]
        changed = eng.generate(other).numpy().astype(int)
    assert np.abs(changed - ours).mean() > 1


def test_long_prompt_is_reported_truncated(
    tiny: LoadedPipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    long = "a very detailed scene " * 6  # 132 characters: the tiny tokenizer reads 77 tokens
    its = expand_items([PromptItem(prompt="short"), PromptItem(prompt=long)], GEN)
    with caplog.at_level(logging.WARNING), Engine(tiny, Storage(str(tmp_path)), EngineOptions()) as eng:
        lines = process_shard(eng, "s0", its)
    assert "truncated" not in lines[0]
    assert lines[1]["truncated"] is True
    assert lines[1]["prompt"] == long  # the manifest still records the full text
    part = [json.loads(x) for x in (tmp_path / "manifest/s0.jsonl").read_text().splitlines()]
    assert [x.get("truncated", False) for x in part] == [False, True]
    assert any("p0000001" in r.getMessage() and "77 tokens" in r.getMessage() for r in caplog.records)
    # A resumed run (images stored) still says so.
    with Engine(tiny, Storage(str(tmp_path)), EngineOptions()) as eng:
        again = process_shard(eng, "s0", its)
    assert again[1]["resumed"] is True and again[1]["truncated"] is True


def test_stop_abandons_the_batch_within_one_step(tiny: LoadedPipeline, tmp_path: Path) -> None:
    # 500 steps: the whole batch would run 500 UNet calls; the stop comes during the 3rd.
    its = expand_items([PromptItem(prompt=f"p {i}") for i in range(4)], GEN.model_copy(update={"steps": 500}))
    stop = threading.Event()
    at_stop: list[int] = []

    def stop_in_third_step(*_: Any) -> None:
        unet_calls[0] += 1
        if unet_calls[0] == 3:
            stop.set()
            at_stop.append(unet_calls[0])

    unet_calls = [0]
    handle = tiny.pipe.unet.register_forward_hook(stop_in_third_step)
    try:
        with Engine(tiny, Storage(str(tmp_path)), EngineOptions(batch_size=4, stop=stop)) as eng:
            with pytest.raises(BatchAbandonedError):
                eng.run(its)
            steps = eng.steps_run
    finally:
        handle.remove()
    assert at_stop == [3]
    # Steps that ran after the stop was set: the one it was set in finishes, nothing more.
    assert unet_calls[0] - at_stop[0] <= 1
    assert steps - at_stop[0] <= 1
    assert not (tmp_path / "images").exists() or not list((tmp_path / "images").iterdir())


def test_inline_encoding_still_works(tiny: LoadedPipeline, tmp_path: Path) -> None:
    """embeds=False (the benchmark's 'before': pipe(...) encodes the prompts) makes the same images."""
    its = with_negatives(4, distinct=2)
    with Engine(tiny, Storage(str(tmp_path)), EngineOptions(batch_size=4, embeds=False)) as eng:
        inline = eng.generate(its).numpy().astype(int)
    with Engine(tiny, Storage(str(tmp_path)), EngineOptions(batch_size=4)) as eng:
        ahead = eng.generate(its).numpy().astype(int)
    assert np.abs(inline - ahead).max() <= 2
