"""The engine on a real (tiny) diffusers pipeline: batching must not change an image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imagebatch.api import Generation, ModelSpec, PromptItem
from imagebatch.errors import ModelLoadError
from imagebatch.planning import Item, expand_items
from imagebatch.storage import Storage
from imagebatch.worker.engine import Engine, EngineOptions
from imagebatch.worker.pipeline import LoadedPipeline, load_pipeline
from imagebatch.worker.shards import process_shard

GEN = Generation(width=32, height=32, steps=4, guidance_scale=5.0, seed=3)


def items(n: int, gen: Generation = GEN) -> list[Item]:
    return expand_items([PromptItem(prompt=f"prompt {i}, a {i % 3} colour scene") for i in range(n)], gen)


def test_image_does_not_depend_on_batch_neighbours(tiny: LoadedPipeline, tmp_path: Path) -> None:
    its = items(8)
    with Engine(tiny, Storage(str(tmp_path)), EngineOptions(batch_size=8)) as eng:
        batched = eng.generate(its).numpy().astype(int)
        singles = np.concatenate([eng.generate([it]).numpy() for it in its]).astype(int)
        # The same item next to other neighbours, in another position of the batch.
        shuffled = eng.generate(its[::-1]).numpy().astype(int)[::-1]
    assert batched.shape == (8, 32, 32, 3)
    assert np.abs(batched - singles).max() <= 2  # BLAS rounding differs with batch shape
    assert np.abs(batched - shuffled).max() <= 2
    # Different seeds really give different images (the check above is not vacuous).
    assert np.abs(batched[0] - batched[1]).mean() > 10


def test_rerun_is_byte_identical(tiny: LoadedPipeline, tmp_path: Path) -> None:
    its = items(6)
    for run in ("a", "b"):
        with Engine(tiny, Storage(str(tmp_path / run)), EngineOptions(batch_size=4)) as eng:
            eng.run(its)
    a = sorted((tmp_path / "a/images").iterdir())
    assert len(a) == 6
    for f in a:
        assert f.read_bytes() == (tmp_path / "b/images" / f.name).read_bytes()


def test_groups_by_parameters_and_keeps_order(tiny: LoadedPipeline, tmp_path: Path) -> None:
    mixed = expand_items(
        [
            PromptItem(prompt="a"),
            PromptItem(prompt="b", width=48),
            PromptItem(prompt="c"),
            PromptItem(prompt="d", steps=2),
        ],
        GEN,
    )
    with Engine(tiny, Storage(str(tmp_path)), EngineOptions(batch_size=8)) as eng:
        results = eng.run(mixed)
    assert [r.item.id for r in results] == [it.id for it in mixed]
    assert {r.batch.batch_size for r in results if r.batch} == {1, 2}
    from PIL import Image

    assert Image.open(tmp_path / "images/p0000001.png").size == (48, 32)


def test_stored_images_are_skipped(tiny: LoadedPipeline, tmp_path: Path) -> None:
    its = items(4)
    st = Storage(str(tmp_path))
    st.write_bytes("images/p0000002.png", b"from an earlier run")
    with Engine(tiny, st, EngineOptions(batch_size=4)) as eng:
        results = eng.run(its)
    assert [r.batch is None for r in results] == [False, False, True, False]
    assert st.read_bytes("images/p0000002.png") == b"from an earlier run"


@pytest.mark.parametrize(("fmt", "magic"), [("png", b"\x89PNG"), ("webp", b"RIFF"), ("jpeg", b"\xff\xd8")])
def test_formats(tiny: LoadedPipeline, tmp_path: Path, fmt: str, magic: bytes) -> None:
    with Engine(
        tiny, Storage(str(tmp_path)), EngineOptions(batch_size=2, image_format=fmt, quality=80)
    ) as eng:
        results = eng.run(items(2))
    assert (tmp_path / results[0].key).read_bytes().startswith(magic)


class OomAbove:
    """Wraps a pipeline so that batches larger than `limit` raise CUDA's out-of-memory error."""

    def __init__(self, pipe: Any, limit: int) -> None:
        self.pipe, self.limit, self.sizes = pipe, limit, []
        self.vae = self  # the engine's first remedy: VAE decode in slices (recorded, not applied)
        self.slicing = False

    def enable_slicing(self) -> None:
        self.slicing = True

    def __call__(self, **kw: Any) -> Any:
        self.sizes.append(len(kw["prompt"]))
        if len(kw["prompt"]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.pipe(**kw)


def test_out_of_memory_halves_the_batch_and_goes_on(
    tiny: LoadedPipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = OomAbove(tiny.pipe, limit=2)
    loaded = LoadedPipeline(**{**tiny.__dict__, "pipe": fake})
    its = items(7)
    with Engine(loaded, Storage(str(tmp_path)), EngineOptions(batch_size=8)) as eng:
        lines = process_shard(eng, "s00000", its)
        assert eng.batch_size == 2
    # First the VAE decodes in slices (same batch again), then batch size 8 halves to 4, then 2.
    assert fake.sizes[:4] == [7, 7, 4, 2]
    assert fake.slicing and "decoding the VAE one image at a time" in caplog.text
    assert len(list((tmp_path / "images").iterdir())) == 7
    assert all(line["oom_halvings"] == 2 and line["batch_size"] <= 2 for line in lines)
    assert "out of memory at batch size 7: going on with batch size 4" in caplog.text
    part = (tmp_path / "manifest/s00000.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in part] == [it.id for it in its]


def test_load_from_a_saved_directory_gives_the_same_images(tiny: LoadedPipeline, tmp_path: Path) -> None:
    tiny.pipe.save_pretrained(tmp_path / "model")
    loaded = load_pipeline(ModelSpec(name=str(tmp_path / "model")), "cpu")
    assert loaded.pipeline_class == "StableDiffusionPipeline"
    its = items(2)
    with Engine(tiny, Storage(str(tmp_path / "a"))) as a, Engine(loaded, Storage(str(tmp_path / "b"))) as b:
        assert torch.equal(a.generate(its), b.generate(its))


def test_scheduler_override(tmp_path: Path) -> None:
    loaded = load_pipeline(ModelSpec(name="builtin:tiny", scheduler="DDIMScheduler"), "cpu")
    assert loaded.scheduler_class == "DDIMScheduler"
    with pytest.raises(ModelLoadError, match="spec.model.scheduler: diffusers has no scheduler 'Nope'"):
        load_pipeline(ModelSpec(name="builtin:tiny", scheduler="Nope"), "cpu")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no-such-org/no-such-model", "cannot load model 'no-such-org/no-such-model'"),
        ("builtin:huge", "unknown built-in model 'builtin:huge'; built-ins are builtin:tiny"),
        ("/nonexistent/model/dir", "model directory '/nonexistent/model/dir' does not exist"),
    ],
)
def test_unknown_model(name: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match="spec.model.name") as e:
        load_pipeline(ModelSpec(name=name), "cpu")
    assert message in str(e.value)


def test_directory_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no model_index.json"):
        load_pipeline(ModelSpec(name=str(tmp_path)), "cpu")


def test_automatic_batch_size_is_found_once_and_remembered(tiny: LoadedPipeline, tmp_path: Path) -> None:
    memory = tmp_path / "cache" / "batch-sizes.json"
    fake = OomAbove(tiny.pipe, limit=3)
    loaded = LoadedPipeline(**{**tiny.__dict__, "pipe": fake})
    with Engine(loaded, Storage(str(tmp_path / "a")), EngineOptions(batch_memory=str(memory))) as eng:
        eng.run(items(9))
    assert fake.sizes[:4] == [8, 8, 4, 2]  # CPU's first guess is 8
    remembered = json.loads(memory.read_text())
    assert list(remembered.values()) == [2] and "32x32" in next(iter(remembered))

    # A restarted worker starts at the size it found, with no out-of-memory errors.
    fake.sizes.clear()
    with Engine(loaded, Storage(str(tmp_path / "b")), EngineOptions(batch_memory=str(memory))) as eng:
        eng.run(items(5))
    assert fake.sizes == [2, 2, 1]


def test_channels_last_and_fused_qkv_keep_the_pixels(tiny: LoadedPipeline, tmp_path: Path) -> None:
    from imagebatch.worker.optimize import Optimizations, optimize

    fresh = load_pipeline(ModelSpec(name="builtin:tiny"), "cpu")
    optimize(fresh, Optimizations(channels_last=True, fuse_qkv=True))
    assert any("to_qkv" in name for name, _ in fresh.pipe.unet.named_modules())
    its = items(4)
    with Engine(tiny, Storage(str(tmp_path / "a"))) as a, Engine(fresh, Storage(str(tmp_path / "b"))) as b:
        plain, fast = a.generate(its).numpy().astype(int), b.generate(its).numpy().astype(int)
    assert np.abs(plain - fast).max() <= 2
