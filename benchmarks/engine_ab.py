"""The engine of several source trees (commits) against plain diffusers, interleaved in one process.

Each `--tree NAME=PATH[?option=value,...]` (EngineOptions fields, Python literals) is a checkout of this repository (e.g. `git worktree add --detach
/tmp/wt-old 68757f7`); its `imagebatch` and `worker/` packages are imported from that path
(no install needed), and its Engine makes the same images on one shared, warmed pipeline, so
the only difference between trees is their engine code. Rounds alternate the order (plain, A, B,
... then ..., B, A, plain) so a load that rises or falls on a shared machine hits every mode
alike; the best round of each counts. Prints JSON lines: every timed run, then per tree the
best images/s, the ratio to plain batched diffusers and the cost relative to the first tree.

    git worktree add --detach /tmp/wt-old 68757f7
    python benchmarks/engine_ab.py --tree old=/tmp/wt-old --tree new=. --rounds 4
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

# The package layout of pyproject.toml (package-dir): these folders are these packages.
LAYOUT = {"imagebatch.worker": "worker", "imagebatch.operator": "operator", "imagebatch": "imagebatch"}


class TreeFinder(importlib.abc.MetaPathFinder):
    """Finds `imagebatch` and its subpackages in one source tree, as the editable install would."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "imagebatch" and not fullname.startswith("imagebatch."):
            return None
        for prefix, folder in LAYOUT.items():  # longest prefix first
            if fullname == prefix:
                d = self.root / folder
                return importlib.util.spec_from_file_location(
                    fullname, d / "__init__.py", submodule_search_locations=[str(d)]
                )
            if fullname.startswith(prefix + "."):
                rest = fullname[len(prefix) + 1 :].split(".")
                base = self.root / folder / Path(*rest)
                if (base / "__init__.py").exists():
                    return importlib.util.spec_from_file_location(
                        fullname, base / "__init__.py", submodule_search_locations=[str(base)]
                    )
                if base.with_suffix(".py").exists():
                    return importlib.util.spec_from_file_location(fullname, base.with_suffix(".py"))
                return None
        return None


def _ours() -> dict[str, ModuleType]:
    return {k: v for k, v in sys.modules.items() if k == "imagebatch" or k.startswith("imagebatch.")}


def _clear() -> None:
    for k in _ours():
        del sys.modules[k]


class Tree:
    """One checkout's engine, its modules kept apart from every other tree's."""

    def __init__(self, name: str, root: Path, options: dict[str, Any] | None = None) -> None:
        self.name, self.root, self.options = name, root, options or {}
        _clear()
        finder = TreeFinder(root)
        sys.meta_path.insert(0, finder)
        try:
            self.engine = importlib.import_module("imagebatch.worker.engine")
            self.pipeline = importlib.import_module("imagebatch.worker.pipeline")
            self.storage = importlib.import_module("imagebatch.storage")
            self.planning = importlib.import_module("imagebatch.planning")
            self.api = importlib.import_module("imagebatch.api")
            self.shards = importlib.import_module("imagebatch.worker.shards")
        finally:
            sys.meta_path.remove(finder)
        self.modules = _ours()
        assert Path(self.engine.__file__ or "").is_relative_to(root), self.engine.__file__
        try:
            self.commit = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            self.commit += "+dirty" if dirty else ""
        except OSError:
            self.commit = "?"

    def activate(self) -> None:
        """This tree's modules in sys.modules, for any import an engine makes while it runs."""
        _clear()
        sys.modules.update(self.modules)

    def items(self, n: int, size: int, steps: int) -> list[Any]:
        gen = self.api.Generation(width=size, height=size, steps=steps, guidance_scale=7.5, seed=0)
        prompts = [
            self.api.PromptItem(prompt=f"a photo of object number {i}, studio light") for i in range(n)
        ]
        return list(self.planning.expand_items(prompts, gen))

    def run(self, pipe: Any, items: list[Any], batch: int, folder: str, shard: bool = False) -> float:
        self.activate()
        loaded = self.pipeline.LoadedPipeline(
            pipe, torch.device("cpu"), torch.float32, "random:tiny", None, "p", "s", 0.0
        )
        t0 = time.perf_counter()
        eng = self.engine.Engine(
            loaded, self.storage.Storage(folder), self.engine.EngineOptions(batch_size=batch, **self.options)
        )
        if shard:  # as local and cluster mode call it: image metadata, then the manifest part
            self.shards.process_shard(eng, "s00000", items)
        else:
            eng.run(items)
        eng.close()
        secs = time.perf_counter() - t0
        written = len(os.listdir(os.path.join(folder, "images")))
        assert written == len(items), f"{self.name} wrote {written} of {len(items)} images"
        return secs


def emit(**rec: Any) -> None:
    print(json.dumps(rec), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout (repeatable)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument(
        "--shard", action="store_true", help="through process_shard (image metadata, manifest part)"
    )
    a = ap.parse_args()

    from archs import build  # imports this checkout's imagebatch.worker.tiny; cleared below

    pipe = build("tiny").to(torch.device("cpu"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    trees = []
    for spec in a.tree:
        name, _, rest = spec.partition("=")
        path, _, opts = rest.partition("?")
        options = {k: ast.literal_eval(v) for k, _, v in (o.partition("=") for o in opts.split(",") if o)}
        trees.append(Tree(name, Path(path).resolve(), options))
    items = {t.name: t.items(a.images, a.size, a.steps) for t in trees}
    first = items[trees[0].name]
    for t in trees[1:]:  # the same work for every tree
        assert [(i.id, i.seed, i.prompt) for i in items[t.name]] == [(i.id, i.seed, i.prompt) for i in first]
    chunks = [first[i : i + a.batch] for i in range(0, len(first), a.batch)]

    def plain() -> float:
        t0 = time.perf_counter()
        for c in chunks:
            pipe(
                prompt=[i.prompt for i in c],
                negative_prompt=[i.negative_prompt for i in c],
                num_inference_steps=c[0].steps,
                guidance_scale=c[0].guidance_scale,
                height=c[0].height,
                width=c[0].width,
                generator=[torch.Generator("cpu").manual_seed(i.seed) for i in c],
                output_type="pil",
            )
        return time.perf_counter() - t0

    emit(
        event="env",
        trees={t.name: f"{t.root} @ {t.commit}" + (f" {t.options}" if t.options else "") for t in trees},
        images=a.images,
        batch=a.batch,
        steps=a.steps,
        size=a.size,
        via="process_shard" if a.shard else "Engine.run",
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        cpus=len(os.sched_getaffinity(0)),
        load=os.getloadavg(),
    )
    out = tempfile.mkdtemp(prefix="imagebatch-ab-")
    # Warm-up, not timed: every shape once, and each tree's engine once.
    plain()
    for t in trees:
        t.run(pipe, items[t.name][: a.batch], a.batch, os.path.join(out, f"warm-{t.name}"))
    modes = ["plain_batched"] + [t.name for t in trees]
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(a.rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        for m in order:
            if m == "plain_batched":
                secs = plain()
            else:
                t = next(t for t in trees if t.name == m)
                secs = t.run(pipe, items[m], a.batch, os.path.join(out, f"r{r}-{m}"), a.shard)
            samples[m].append(secs)
            emit(event="run", round=r, mode=m, seconds=round(secs, 3), load1=os.getloadavg()[0])
    shutil.rmtree(out, ignore_errors=True)
    best = {m: min(s) for m, s in samples.items()}
    base = trees[0].name
    for m in modes:
        rec: dict[str, Any] = dict(
            event="best",
            mode=m,
            images_per_s=round(a.images / best[m], 3),
            rounds_images_per_s=[round(a.images / s, 3) for s in samples[m]],
        )
        if m != "plain_batched":
            rec["vs_plain_batched"] = round(best["plain_batched"] / best[m], 3)
            # Per round too: each round's engine against the plain run next to it.
            rec["rounds_vs_plain"] = [
                round(p / s, 3) for p, s in zip(samples["plain_batched"], samples[m], strict=True)
            ]
            rec[f"seconds_vs_{base}"] = round(best[m] / best[base], 3)
        emit(**rec)
    emit(event="load", load=os.getloadavg())


if __name__ == "__main__":
    main()
