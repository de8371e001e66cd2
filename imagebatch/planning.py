"""Planning: prompts to items (stable ids and seeds), items to shards. Pure functions."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from imagebatch.api import Generation, PromptItem
from imagebatch.errors import SpecError


@dataclass(frozen=True, slots=True)
class Item:
    """One image to make. Its id fixes its output key; its seed fixes its pixels."""

    id: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float

    def params_key(self) -> tuple[int, int, int, float]:
        """Items with equal keys can share a denoising batch."""
        return (self.width, self.height, self.steps, self.guidance_scale)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ShardRange:
    index: int
    start: int  # first item index, inclusive
    end: int  # last item index, exclusive

    @property
    def id(self) -> str:
        return shard_id(self.index)

    def __len__(self) -> int:
        return self.end - self.start


def default_prompt_id(index: int) -> str:
    # Zero-padded so that keys sort in prompt order up to 10 million prompts.
    return f"p{index:07d}"


def derive_seed(job_seed: int, item_id: str) -> int:
    """A seed from the job seed and the item id alone, so it does not move when other prompts change."""
    digest = hashlib.sha256(f"{job_seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def shard_id(index: int) -> str:
    return f"s{index:05d}"


def expand_items(prompts: Iterable[PromptItem], gen: Generation) -> list[Item]:
    """Each prompt gives `imagesPerPrompt` items; user-given ids and seeds win over derived ones.

    `prompts` may be a stream: only the items (slotted, small) are kept, never the prompt rows.
    """
    items: list[Item] = []
    first_index: dict[str, int] = {}
    per = gen.images_per_prompt
    for index, p in enumerate(prompts):
        pid = p.id or default_prompt_id(index)
        for k in range(per):
            iid = pid if per == 1 else f"{pid}_{k}"
            if iid in first_index:
                raise SpecError(
                    f"prompt {index}: its item id is also used by prompt {first_index[iid]}; "
                    "give every prompt a unique id"
                )
            first_index[iid] = index
            seed = (p.seed + k) % 2**63 if p.seed is not None else derive_seed(gen.seed, iid)
            items.append(
                Item(
                    id=iid,
                    prompt=p.prompt,
                    negative_prompt=p.negative_prompt
                    if p.negative_prompt is not None
                    else gen.negative_prompt,
                    seed=seed,
                    width=p.width or gen.width,
                    height=p.height or gen.height,
                    steps=p.steps or gen.steps,
                    guidance_scale=p.guidance_scale if p.guidance_scale is not None else gen.guidance_scale,
                )
            )
    return items


def plan_shards(n_items: int, shard_size: int) -> list[ShardRange]:
    """Contiguous ranges of `shard_size` items; the last one may be shorter."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    return [
        ShardRange(index=i, start=start, end=min(start + shard_size, n_items))
        for i, start in enumerate(range(0, n_items, shard_size))
    ]
