"""Output layouts: how a shard's images are laid out in the output. Start here for a new one.

A layout owns four things, and nothing else in the code branches on which layout a job has:
- `key`: the storage key a manifest line names for an image (its file, or its shard's container);
- `open_shard`: the shard's writer (`ShardWriter`), where the engine puts encoded images, and
  its `finish`, which writes the shard's container (if any) once every image is made and may add
  fields to the manifest lines (where an image sits inside the container);
- `join_files`: what the join writes beside manifest.jsonl, one row per manifest line;
- `fingerprint_entry`: what the layout adds to the job's fingerprint (`fingerprint.image_fields`).

The layouts live in `LAYOUTS` by name; `spec.output.layout` names one. `files` and `webdataset`
are the built-in ones (the names the API accepts); `register` adds one in code (tests).

A new layout: one `OutputLayout` subclass (a `ContainerLayout` for one file per shard: its key,
`pack` and `unpack`), `register(MyLayout())`, and its name in the API's `Output.layout` for
users' specs (tests/worker/test_zip_layout.py registers a zip layout and builds its spec past
validation instead).
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from imagebatch.errors import SpecError
from imagebatch.storage import (
    EXTENSIONS,
    HF_METADATA,
    Storage,
    build_tar,
    image_key,
    read_tar,
    shard_tar_key,
)

if TYPE_CHECKING:
    from imagebatch.planning import Item


@dataclass(frozen=True)
class Made:
    """An image of the shard that is stored (made now or by an earlier run), and its manifest line."""

    item: Item
    key: str  # the writer's key for it (`ShardWriter.key`)
    line: dict[str, Any]  # `finish` may add fields; the manifest part gets the line as it is then


class ShardWriter(ABC):
    """One shard's images on their way to storage: the engine asks which are stored already,
    then writes each image it makes (from encoder threads) under `key(item_id)`."""

    @abstractmethod
    def key(self, item_id: str) -> str: ...

    @abstractmethod
    def existing(self, keys: Iterable[str]) -> set[str]: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def finish(self, made: Sequence[Made]) -> None:
        """After the last image, before the manifest part: write what holds the images, if anything."""


@dataclass(frozen=True)
class JoinFile:
    """A file the join writes beside manifest.jsonl: `row(line)` for every manifest line, as JSON lines."""

    key: str
    row: Callable[[dict[str, Any]], dict[str, Any]]


class OutputLayout(ABC):
    name: ClassVar[str]

    @abstractmethod
    def key(self, shard: str, item_id: str, fmt: str) -> str:
        """The key a manifest line names for the item's image."""

    @abstractmethod
    def open_shard(self, storage: Storage, shard: str, items: Sequence[Item], fmt: str) -> ShardWriter:
        """The shard's writer; raises SpecError for items this layout cannot hold."""

    def join_files(self) -> list[JoinFile]:
        return []

    def fingerprint_entry(self) -> dict[str, Any]:
        """Merged into the fingerprinted spec fields: a layout's outputs are not another's."""
        return {"layout": self.name}


class ImageFiles(ShardWriter):
    """Loose image files, `images/<id>.<ext>`, each written atomically as it is made."""

    def __init__(self, storage: Storage, fmt: str) -> None:
        self.storage = storage
        self.fmt = fmt

    def key(self, item_id: str) -> str:
        return image_key(item_id, self.fmt)

    def existing(self, keys: Iterable[str]) -> set[str]:
        return self.storage.existing(keys)

    def write_bytes(self, key: str, data: bytes) -> None:
        self.storage.write_bytes(key, data)

    def finish(self, made: Sequence[Made]) -> None:
        pass  # each image was written as it was made


class FilesLayout(OutputLayout):
    """images/<id>.<ext>, one file each, and metadata.jsonl for Hugging Face imagefolder."""

    name = "files"

    def key(self, shard: str, item_id: str, fmt: str) -> str:
        return image_key(item_id, fmt)

    def open_shard(self, storage: Storage, shard: str, items: Sequence[Item], fmt: str) -> ShardWriter:
        return ImageFiles(storage, fmt)

    def join_files(self) -> list[JoinFile]:
        from imagebatch.manifest import imagefolder_line  # manifest imports this module

        return [JoinFile(HF_METADATA, imagefolder_line)]

    def fingerprint_entry(self) -> dict[str, Any]:
        # Nothing: outputs made before layouts existed keep their fingerprint.
        return {}


class ContainerLayout(OutputLayout):
    """A layout that writes each shard's images into one file (one write per shard, one PUT on
    object storage, instead of one per image): a subclass says where it goes and how it is packed."""

    @abstractmethod
    def container_key(self, shard: str) -> str: ...

    @abstractmethod
    def pack(self, made: Sequence[Made], images: dict[str, bytes]) -> bytes:
        """The container of the shard's images (`images[m.key]` for each of `made`, in order);
        may add fields to the lines (where each image sits in it)."""

    @abstractmethod
    def unpack(self, data: bytes) -> dict[str, bytes]:
        """A container's members by name: the images an interrupted run already made."""

    def check_items(self, items: Sequence[Item]) -> None:
        """Raises SpecError for an item this layout cannot hold."""

    def key(self, shard: str, item_id: str, fmt: str) -> str:
        return self.container_key(shard)

    def open_shard(self, storage: Storage, shard: str, items: Sequence[Item], fmt: str) -> ShardWriter:
        self.check_items(items)
        return ContainerShard(self, storage, shard, fmt)


class ContainerShard(ShardWriter):
    """A shard's images held in memory (encoders are threads), keyed by member name
    `<id>.<ext>`, until `finish` writes the container. Resumable per shard: a container already
    written (the manifest part was not, yet) gives back its images."""

    def __init__(self, layout: ContainerLayout, storage: Storage, shard: str, fmt: str) -> None:
        self.layout = layout
        self.storage = storage
        self.container = layout.container_key(shard)
        self.ext = EXTENSIONS[fmt]
        stored = layout.unpack(storage.read_bytes(self.container)) if storage.exists(self.container) else {}
        self.files = {n: b for n, b in stored.items() if n.endswith(f".{self.ext}")}
        self._lock = threading.Lock()

    def key(self, item_id: str) -> str:
        return f"{item_id}.{self.ext}"

    def existing(self, keys: Iterable[str]) -> set[str]:
        return {k for k in keys if k in self.files}

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._lock:
            self.files[key] = data

    def finish(self, made: Sequence[Made]) -> None:
        data = self.layout.pack(made, self.files)
        self.storage.write_bytes(self.container, data)  # atomic: temp file and rename, or one PUT


class WebdatasetLayout(ContainerLayout):
    """shards/<shard>.tar holding <id>.<ext> and <id>.json per image."""

    name = "webdataset"

    def container_key(self, shard: str) -> str:
        return shard_tar_key(shard)

    def check_items(self, items: Sequence[Item]) -> None:
        for it in items:
            if "." in it.id:
                # webdataset readers split a member name at its first dot: `a.b.png` would be key `a`.
                raise SpecError(
                    f"item id {it.id!r} holds a '.', which webdataset readers take as the start of the "
                    "file extension; use ids without dots with spec.output.layout webdataset"
                )

    def pack(self, made: Sequence[Made], images: dict[str, bytes]) -> bytes:
        files: list[tuple[str, bytes]] = []
        for m in made:
            files.append((m.key, images[m.key]))
            files.append((f"{m.item.id}.json", (json.dumps(m.line, ensure_ascii=False) + "\n").encode()))
        data, members = build_tar(files)
        for m in made:  # after the tar: its JSON members are the lines without these
            member = members[m.key]
            m.line.update(member=member.name, offset=member.offset, size=member.size)
        return data

    def unpack(self, data: bytes) -> dict[str, bytes]:
        return read_tar(data)


LAYOUTS: dict[str, OutputLayout] = {layout.name: layout for layout in (FilesLayout(), WebdatasetLayout())}


def register(layout: OutputLayout) -> OutputLayout:
    """Adds a layout by its name (the API's Output.layout must name it for users' specs)."""
    LAYOUTS[layout.name] = layout
    return layout


def layout_for(layout: str | OutputLayout) -> OutputLayout:
    if isinstance(layout, OutputLayout):
        return layout
    try:
        return LAYOUTS[layout]
    except KeyError:
        # The name is the user's: not echoed (the API admits only the built-in ones anyway).
        raise SpecError(f"spec.output.layout: not a layout; one of {', '.join(sorted(LAYOUTS))}") from None
