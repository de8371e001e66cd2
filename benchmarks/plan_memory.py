"""Peak memory of planning a job whose prompts are a large Parquet file. Prints one JSON line.

Planning is what a worker (or `imagebatch validate`) does before the first image: stream the
prompt rows, expand them into items with ids and seeds, cut the items into shards and take the
job's fingerprint. It runs in a fresh child process, so its peak resident set (ru_maxrss of that
child) is the planning alone, interpreter and imports included.

    python benchmarks/plan_memory.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from imagebatch.api import ImageBatchJobSpec
from imagebatch.fingerprint import fingerprint, image_fields
from imagebatch.planning import expand_items, plan_shards
from imagebatch.prompts import iter_prompts

spec = ImageBatchJobSpec.model_validate({
    "model": {"name": "builtin:tiny"},
    "promptsFrom": {"uri": sys.argv[1], "column": "caption", "seedColumn": "seed"},
    "batching": {"shardSize": 256},
    "output": {"uri": "/tmp/unused"},
})
t0 = time.perf_counter()
items = expand_items(iter_prompts(spec), spec.generation)
shards = plan_shards(len(items), spec.batching.shard_size)
digest = fingerprint(image_fields(spec), items)
print(json.dumps({"items": len(items), "shards": len(shards), "plan_seconds": round(time.perf_counter() - t0, 2),
                  "fingerprint": digest[:12]}))
"""


def write_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Captions of realistic length (about 90 characters), written in chunks to keep this small too.
    with pq.ParquetWriter(
        path, pa.schema([("caption", pa.string()), ("seed", pa.int64()), ("url", pa.string())])
    ) as w:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            w.write_table(
                pa.table(
                    {
                        "caption": [
                            f"a photograph of object number {i}, golden hour light, 35mm film, shallow depth of field"
                            for i in range(start, start + n)
                        ],
                        "seed": list(range(start, start + n)),
                        "url": [f"https://example.com/images/{i}.jpg" for i in range(start, start + n)],
                    }
                )
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.parquet"
        write_parquet(path, args.rows)
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)], check=True, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        result = json.loads(out.stdout)
        result.update(
            bench="plan_memory",
            rows=args.rows,
            parquet_mib=round(path.stat().st_size / 2**20, 1),
            peak_rss_mib=round(peak_kib / 1024, 1),
            limit_mib=1024,
            below_limit=peak_kib / 1024 < 1024,
            wall_seconds=round(wall, 1),
            python=platform.python_version(),
            machine=f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs",
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
