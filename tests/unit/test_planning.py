"""Planning: stable ids and seeds, user values winning, and shards covering every item once."""

from __future__ import annotations

import pytest

from imagebatch.api import Generation, PromptItem
from imagebatch.errors import SpecError
from imagebatch.fingerprint import fingerprint
from imagebatch.planning import derive_seed, expand_items, plan_shards


def prompts(*texts: str) -> list[PromptItem]:
    return [PromptItem(prompt=t) for t in texts]


def test_ids_and_seeds_are_stable_and_positional() -> None:
    gen = Generation(seed=7)
    a = expand_items(prompts("x", "y", "z"), gen)
    b = expand_items(prompts("x", "y", "z"), gen)
    assert [i.id for i in a] == ["p0000000", "p0000001", "p0000002"]
    assert a == b
    assert len({i.seed for i in a}) == 3


def test_seed_depends_on_job_seed_and_id_only() -> None:
    one = expand_items(prompts("x", "y"), Generation(seed=1))
    # Editing another prompt does not move this item's seed.
    other = expand_items(prompts("x", "changed"), Generation(seed=1))
    assert one[0].seed == other[0].seed == derive_seed(1, "p0000000")
    assert expand_items(prompts("x"), Generation(seed=2))[0].seed != one[0].seed


def test_user_id_and_seed_win() -> None:
    items = expand_items([PromptItem(id="hero", prompt="x", seed=42)], Generation())
    assert items[0].id == "hero"
    assert items[0].seed == 42


def test_images_per_prompt() -> None:
    items = expand_items(
        [PromptItem(id="a", prompt="x", seed=10), PromptItem(prompt="y")], Generation(images_per_prompt=3)
    )
    assert [i.id for i in items] == ["a_0", "a_1", "a_2", "p0000001_0", "p0000001_1", "p0000001_2"]
    assert [i.seed for i in items[:3]] == [10, 11, 12]


def test_overrides_and_defaults() -> None:
    gen = Generation(width=64, height=64, steps=5, guidance_scale=3.0, negative_prompt="blurry")
    items = expand_items(
        [PromptItem(prompt="x", width=128, guidance_scale=0.0, negative_prompt=""), PromptItem(prompt="y")],
        gen,
    )
    assert (items[0].width, items[0].height, items[0].guidance_scale, items[0].negative_prompt) == (
        128,
        64,
        0.0,
        "",
    )
    assert (items[1].width, items[1].steps, items[1].negative_prompt) == (64, 5, "blurry")
    assert items[0].params_key() != items[1].params_key()


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(SpecError, match="prompt 1: its item id is also used by prompt 0"):
        expand_items([PromptItem(id="a", prompt="x"), PromptItem(id="a", prompt="y")], Generation())


@pytest.mark.parametrize(("n", "size"), [(1, 1), (10, 3), (9, 3), (1000, 256), (5, 100)])
def test_shards_cover_every_item_once(n: int, size: int) -> None:
    shards = plan_shards(n, size)
    covered = [i for s in shards for i in range(s.start, s.end)]
    assert covered == list(range(n))
    assert all(0 < len(s) <= size for s in shards)
    assert [s.id for s in shards][:2] == ["s00000", "s00001"][: len(shards)]


def test_fingerprint_changes_with_what_decides_pixels() -> None:
    items = expand_items(prompts("x"), Generation())
    base = fingerprint({"steps": 4}, items)
    assert fingerprint({"steps": 4}, items) == base
    assert fingerprint({"steps": 5}, items) != base
    assert fingerprint({"steps": 4}, expand_items(prompts("y"), Generation())) != base
