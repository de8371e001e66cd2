"""Lanes: batches made side by side on the CPU, on the real tiny pipeline."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from imagebatch.api import Generation, PromptItem
from imagebatch.planning import Item, expand_items
from imagebatch.storage import Storage
from imagebatch.worker.engine import Engine, EngineOptions, ItemResult
from imagebatch.worker.pipeline import LoadedPipeline

GEN = Generation(width=32, height=32, steps=2, guidance_scale=5.0, seed=5)


def items(n: int) -> list[Item]:
    return expand_items([PromptItem(prompt=f"lane prompt {i}") for i in range(n)], GEN)


def pixels(folder: Path) -> dict[str, np.ndarray[Any, Any]]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted((folder / "images").iterdir())}


def test_two_lanes_make_the_one_lane_images_each_once(tiny: LoadedPipeline, tmp_path: Path) -> None:
    its = items(10)  # batches of 3: four batches over two lanes
    seen: list[str] = []
    threads: set[str] = set()

    def on_done(r: ItemResult) -> None:
        seen.append(r.item.id)

    def in_unet(*_: Any) -> None:
        threads.add(threading.current_thread().name)

    handle = tiny.pipe.unet.register_forward_hook(in_unet)
    try:
        with Engine(tiny, Storage(str(tmp_path / "two")), EngineOptions(batch_size=3, lanes=2)) as eng:
            results = eng.run(its, on_done)
    finally:
        handle.remove()
    assert eng.lanes == 2 and len({t for t in threads if t.startswith("lane")}) == 2
    assert [r.item.id for r in results] == [it.id for it in its]
    assert sorted(seen) == sorted(it.id for it in its)  # each item reported once
    assert sorted({r.batch.batch_size for r in results if r.batch}) == [1, 3]  # the same batches
    assert torch.get_num_threads() >= 1
    with Engine(tiny, Storage(str(tmp_path / "one")), EngineOptions(batch_size=3, lanes=1)) as eng:
        eng.run(its)
    two, one = pixels(tmp_path / "two"), pixels(tmp_path / "one")
    assert two.keys() == one.keys() and len(two) == 10
    # One intra-op thread instead of two may round differently, never by more than a level.
    assert max(int(np.abs(two[k] - one[k]).max()) for k in two) <= 1


def test_a_failing_lane_stops_the_others_and_its_error_is_raised(
    tiny: LoadedPipeline, tmp_path: Path
) -> None:
    calls = [0]

    def broken_from_the_third_call(*_: Any) -> None:
        # Every call from then on: no single item is to blame (a one-off failure would be split
        # and made item by item, worker/itemfail.py), so the batch's error is the lane's.
        calls[0] += 1
        if calls[0] >= 3:
            raise RuntimeError("a broken batch")

    handle = tiny.pipe.unet.register_forward_hook(broken_from_the_third_call)
    try:
        with (
            Engine(tiny, Storage(str(tmp_path)), EngineOptions(batch_size=2, lanes=2)) as eng,
            pytest.raises(RuntimeError, match="a broken batch"),
        ):
            eng.run(items(12))
    finally:
        handle.remove()
    # The lanes stopped: far fewer UNet calls than the 12 that six batches of two steps need.
    assert calls[0] < 12
