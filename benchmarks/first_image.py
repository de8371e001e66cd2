"""Seconds from process start to the first stored image, with torch.compile and a compile cache.

Run it twice with the same --cache: the first run compiles (cold), the second reads compiled
kernels from the cache, as a restarted worker with the cache on a volume does. Prints JSON.

    python benchmarks/first_image.py --arch sd15 --batch 64 --cache /tmp/ib-cache   # cold
    python benchmarks/first_image.py --arch sd15 --batch 64 --cache /tmp/ib-cache   # warm
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before the heavy imports: a restarted worker pays them too

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from archs import SIZES, build  # noqa: E402

from imagebatch.api import Generation, PromptItem  # noqa: E402
from imagebatch.planning import expand_items  # noqa: E402
from imagebatch.storage import Storage  # noqa: E402
from imagebatch.worker.engine import Engine, EngineOptions  # noqa: E402
from imagebatch.worker.optimize import Optimizations, optimize  # noqa: E402
from imagebatch.worker.pipeline import LoadedPipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int)
    ap.add_argument("--cache", required=True, help="compile cache folder (keep it between the two runs)")
    a = ap.parse_args()
    cold = not any(Path(a.cache).glob("**/*")) if os.path.isdir(a.cache) else True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = build(a.arch).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    loaded = LoadedPipeline(pipe, device, dtype, f"random:{a.arch}", None, type(pipe).__name__, "Euler", 0.0)
    t_load = time.perf_counter() - T0
    optimize(loaded, Optimizations(channels_last=True, fuse_qkv=True, compile=True, compile_cache=a.cache))
    size = a.size or SIZES[a.arch]
    items = expand_items(
        [PromptItem(prompt=f"prompt {i}") for i in range(a.batch)],
        Generation(width=size, height=size, steps=a.steps),
    )
    out = tempfile.mkdtemp()
    with Engine(loaded, Storage(out), EngineOptions(batch_size=a.batch)) as engine:
        engine.run(items)
        t_first = time.perf_counter() - T0
        t1 = time.perf_counter()
        engine.storage = Storage(tempfile.mkdtemp())
        engine.run(items)
        t_batch = time.perf_counter() - t1
    print(
        json.dumps(
            dict(
                event="first_image",
                arch=a.arch,
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                cache="cold" if cold else "warm",
                batch=a.batch,
                seconds_to_model_loaded=round(t_load, 2),
                seconds_to_first_batch_stored=round(t_first, 2),
                seconds_next_batch=round(t_batch, 3),
                torch=torch.__version__,
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
