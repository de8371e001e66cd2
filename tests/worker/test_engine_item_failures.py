"""Issue 21: an item the engine cannot make costs that item, not its batch or its shard.

The real engine on the tiny pipeline; the failing item is made to fail by the failpoint the e2e
tests use (`batch:<id>=raise`, worker/failpoints.py), which also records every batch call.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from imagebatch.api import Generation, PromptItem
from imagebatch.manifest import ERRORS, error_part_key, join_outputs
from imagebatch.planning import Item, expand_items
from imagebatch.storage import Storage, manifest_part_key
from imagebatch.worker import engine as engine_module
from imagebatch.worker.engine import BatchAbandonedError, Engine, EngineOptions
from imagebatch.worker.failpoints import Failpoints
from imagebatch.worker.pipeline import LoadedPipeline
from imagebatch.worker.shards import process_shard

GEN = Generation(width=32, height=32, steps=2, guidance_scale=5.0, seed=3)
SECRET = "zebra-unicorn-7 painted in a very particular way"


def items(n: int) -> list[Item]:
    return expand_items([PromptItem(prompt=f"{SECRET} {i}") for i in range(n)], GEN)


def armed(tmp_path: Path, item: str) -> Failpoints:
    d = tmp_path / "fp"
    d.mkdir(exist_ok=True)
    return Failpoints.from_env(
        {"IMAGEBATCH_FAILPOINTS": f"batch:{item}=raise", "IMAGEBATCH_FAILPOINT_DIR": str(d)}
    )


def calls(fp: Failpoints) -> list[dict[str, Any]]:
    return [
        json.loads(x) for p in Path(fp.directory).glob("batches-*.jsonl") for x in p.read_text().splitlines()
    ]


def test_one_bad_item_in_a_batch_of_8_costs_only_that_item(tiny: LoadedPipeline, tmp_path: Path) -> None:
    its = items(8)
    fp = armed(tmp_path, "p0000005")
    st = Storage(str(tmp_path / "out"))
    with Engine(tiny, st, EngineOptions(batch_size=8, before_batch=fp.before_batch)) as eng:
        results = eng.run(its)
    assert [r.item.id for r in results] == [it.id for it in its]
    bad = [r for r in results if r.error is not None]
    assert [r.item.id for r in bad] == ["p0000005"]
    assert bad[0].error is not None and bad[0].error.type == "FailpointItemError"
    stored = sorted(p.name for p in (tmp_path / "out/images").iterdir())
    assert stored == [f"p{i:07d}.png" for i in range(8) if i != 5]
    # Each good item was made by exactly one batch call that did not raise; the bad one by none;
    # the splits: 8 (raised), 0-3 (made), 4-7 (raised), 4-5 (raised), 6-7 (made), 4 (made), 5 (raised).
    log = calls(fp)
    made = Counter(i for c in log if not c["raised"] for i in c["ids"])
    assert made == Counter({f"p{i:07d}": 1 for i in range(8) if i != 5})
    assert sorted((len(c["ids"]), c["raised"]) for c in log) == sorted(
        [(8, True), (4, False), (4, True), (2, True), (2, False), (1, False), (1, True)]
    )


def test_the_shard_lists_its_failed_items_and_the_join_reports_them(
    tiny: LoadedPipeline, tmp_path: Path
) -> None:
    its = items(6)
    fp = armed(tmp_path, "p0000002")
    st = Storage(str(tmp_path / "out"))
    with Engine(tiny, st, EngineOptions(batch_size=4, before_batch=fp.before_batch)) as eng:
        lines0 = process_shard(eng, "s00000", its[:3])
        lines1 = process_shard(eng, "s00001", its[3:])
    assert [line["id"] for line in lines0] == ["p0000000", "p0000001"]
    assert len(lines1) == 3 and not st.exists(error_part_key("s00001"))
    part = [json.loads(x) for x in st.read_bytes(error_part_key("s00000")).decode().splitlines()]
    assert [(e["id"], e["shard"], e["error"]) for e in part] == [("p0000002", "s00000", "FailpointItemError")]
    assert st.exists(manifest_part_key("s00000"))

    assert join_outputs(st, "t", ["s00000", "s00001"], "files", expected=6) == 5
    manifest = [json.loads(x) for x in (tmp_path / "out/manifest.jsonl").read_text().splitlines()]
    assert sorted(m["id"] for m in manifest) == [f"p{i:07d}" for i in range(6) if i != 2]
    errors = [json.loads(x) for x in (tmp_path / "out" / ERRORS).read_text().splitlines()]
    assert [e["id"] for e in errors] == ["p0000002"]
    table = pq.read_table(tmp_path / "out/manifest.parquet").to_pylist()
    assert len(table) == 6
    (row,) = [r for r in table if r["error"]]
    assert row["id"] == "p0000002" and row["error"].startswith("FailpointItemError: ")
    assert all(r["error"] is None for r in table if r["id"] != "p0000002")
    # No prompt bytes in what describes the failure (only the id).
    assert SECRET[:10] not in (tmp_path / "out" / ERRORS).read_text()
    # The count must add up: made lines plus failed items are the job's items.
    with pytest.raises(RuntimeError, match="5 lines and 1 failed items for 7"):
        join_outputs(st, "t", ["s00000", "s00001"], "files", expected=7)


def test_a_later_part_that_makes_a_failed_item_clears_it(tiny: LoadedPipeline, tmp_path: Path) -> None:
    its = items(4)
    fp = armed(tmp_path, "p0000001")
    st = Storage(str(tmp_path / "out"))
    with Engine(tiny, st, EngineOptions(batch_size=4, before_batch=fp.before_batch)) as eng:
        process_shard(eng, "s00000", its)
    join_outputs(st, "t", ["s00000"], "files", expected=4)
    assert (tmp_path / "out" / ERRORS).read_text().strip()
    with Engine(tiny, st, EngineOptions(batch_size=4)) as eng:  # the failpoint cleared: a retry job
        process_shard(eng, "s00001", [its[1]])
    assert join_outputs(st, "t", ["s00000", "s00001"], "files", expected=4) == 4
    ids = [json.loads(x)["id"] for x in (tmp_path / "out/manifest.jsonl").read_text().splitlines()]
    assert sorted(ids) == [f"p{i:07d}" for i in range(4)]
    assert (tmp_path / "out" / ERRORS).read_text() == ""


def test_a_batch_whose_every_item_fails_is_not_blamed_on_its_items(
    tiny: LoadedPipeline, tmp_path: Path
) -> None:
    def broken(batch: Any) -> None:
        raise ValueError("the pipeline is broken for everyone")

    with (
        Engine(tiny, Storage(str(tmp_path)), EngineOptions(batch_size=4, before_batch=broken)) as eng,
        pytest.raises(ValueError, match="broken for everyone"),
    ):
        eng.run(items(4))


def test_engine_errors_that_no_item_causes_are_raised(tiny: LoadedPipeline, tmp_path: Path) -> None:
    def cuda(batch: Any) -> None:
        if len(batch) > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with (
        Engine(tiny, Storage(str(tmp_path)), EngineOptions(batch_size=4, before_batch=cuda)) as eng,
        pytest.raises(RuntimeError, match="illegal memory access"),
    ):
        eng.run(items(4))

    def stopped(batch: Any) -> None:
        raise BatchAbandonedError("stopped after denoising step 1")

    with (
        Engine(tiny, Storage(str(tmp_path)), EngineOptions(batch_size=4, before_batch=stopped)) as eng,
        pytest.raises(BatchAbandonedError),
    ):
        eng.run(items(4))


def test_an_image_that_cannot_be_encoded_is_that_items_failure(
    tiny: LoadedPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = engine_module.encode_image

    def encode(arr: Any, fmt: str, quality: int, meta: dict[str, Any] | None = None) -> bytes:
        if meta and meta.get("id") == "p0000001":
            raise OSError(f"cannot encode {meta.get('prompt')}")
        return real(arr, fmt, quality, meta)

    monkeypatch.setattr(engine_module, "encode_image", encode)
    st = Storage(str(tmp_path))
    with Engine(tiny, st, EngineOptions(batch_size=4)) as eng:
        lines = process_shard(eng, "s00000", items(3))
    assert [line["id"] for line in lines] == ["p0000000", "p0000002"]
    (err,) = [json.loads(x) for x in st.read_bytes(error_part_key("s00000")).decode().splitlines()]
    assert err["id"] == "p0000001" and err["error"] == "OSError"
    assert SECRET not in err["message"] and "<prompt>" in err["message"]
