"""A batch that fails for one of its items costs that item, not the batch or the shard.

When a denoising batch (or its text encoding) raises an error that is neither an out-of-memory
error (the engine halves the batch for those) nor a sign of a broken device or process, the batch
is split in halves and each half is tried again, down to single items: every item that can be
made is made once, and each item that fails alone is reported with its error. A batch of several
items in which every item fails alone was not failed by its items (the pipeline, the device or
the settings of the whole job are broken): the first error is raised, and the shard's attempt
fails as before.

An error's message is the engine's, but it can quote input (a tokenizer that cannot take a
string repeats it): the item's prompt and negative prompt are cut out of it, it is kept to one
printable line, and its length is bounded, so errors.jsonl and the shard's status never carry
prompt bytes beyond the item's id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imagebatch.errors import ImageBatchError
from imagebatch.planning import Item

MESSAGE_CHARS = 300


@dataclass(frozen=True)
class ItemError:
    """Why one item could not be made: the error's type and a message that quotes no prompt."""

    type: str
    message: str


@dataclass(frozen=True)
class Part:
    """A sub-batch that was made: its items, what the engine returned, and how long it took."""

    items: list[Item]
    made: Any  # the engine's result for these items (HostImages)
    truncated: list[bool]
    seconds: float


# Errors of the process or the device, not of an item: retrying parts of the batch cannot help.
FATAL_MARKERS = ("cuda error", "device-side assert", "illegal memory access", "cublas", "cudnn", "nccl")


def is_item_error(err: BaseException, not_items: Callable[[BaseException], bool]) -> bool:
    """Whether an error of a batch may be caused by (some of) its items; `not_items` names the
    engine's own errors that never are (out of memory, a stopped batch)."""
    if not isinstance(err, Exception) or not_items(err):
        return False
    if isinstance(err, ImageBatchError):  # a user error of the whole job: no item is to blame
        return False
    text = str(err).lower()
    return not any(m in text for m in FATAL_MARKERS)


def describe(err: BaseException, item: Item) -> ItemError:
    """The error of one item, with its prompts cut out of the message."""
    msg = str(err)
    for text in sorted({item.prompt, item.negative_prompt}, key=len, reverse=True):
        for piece in [text, *text.splitlines()]:
            if len(piece.strip()) >= 3:
                msg = msg.replace(piece, "<prompt>")
    msg = " ".join("".join(c if c.isprintable() and c.isascii() else "?" for c in msg).split())
    if len(msg) > MESSAGE_CHARS:
        msg = msg[: MESSAGE_CHARS - 3] + "..."
    return ItemError(type(err).__name__, msg)


def isolate(
    items: Sequence[Item],
    error: BaseException,
    make: Callable[[list[Item]], tuple[Any, list[bool]]],
    not_items: Callable[[BaseException], bool],
) -> tuple[list[Part], list[tuple[Item, ItemError]]]:
    """Splits the failed batch `items` (which raised `error`) until each part is made or is one
    failing item. `make(items)` makes a sub-batch (raising as the batch did) and returns the
    engine's result and which prompts were cut. Raises `error` when it is not an item's, or when
    every item of a batch of several fails alone."""
    if not is_item_error(error, not_items):
        raise error
    parts: list[Part] = []
    failed: list[tuple[Item, ItemError]] = []

    def split(batch: list[Item], err: BaseException) -> None:
        if len(batch) == 1:
            failed.append((batch[0], describe(err, batch[0])))
            return
        mid = len(batch) // 2
        for half in (batch[:mid], batch[mid:]):
            t0 = time.perf_counter()
            try:
                made, truncated = make(half)
            except Exception as e:
                if not is_item_error(e, not_items):
                    raise
                split(half, e)
                continue
            parts.append(Part(half, made, truncated, time.perf_counter() - t0))

    split(list(items), error)
    if not parts and len(items) > 1:
        raise error
    return parts, failed
