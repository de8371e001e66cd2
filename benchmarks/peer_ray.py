"""imagebatch against Ray Data on the same pipeline: the same prompts, seeds and PNG files.

Ray Data runs `map_batches` with a callable class that loads `builtin:tiny` once per actor, makes
each batch with one `pipe(...)` call (a CPU generator per image, as the engine seeds them) and
writes every image as a PNG file. imagebatch runs `imagebatch run` of a job with the same
prompts, counted as the whole process (interpreter start, imports, model load, images, the
manifest, its Parquet and the contact sheet). Ray is counted from the dataset's creation to its
last written file, with `ray.init` and the driver's imports before the clock (a Ray cluster is
usually up already); its actors' start and model load are inside. Rounds alternate the order
(imagebatch, Ray, then Ray, imagebatch), best of each. Prints JSON lines.

Ray is never a dependency of this project: it goes into a virtual environment of its own, which
reads torch, diffusers and imagebatch from the project's environment (pinned numpy, pyarrow and
pandas keep the shared packages identical):

    python3 -m venv /work/ray-venv
    /work/ray-venv/bin/pip install "ray[data]==2.60.0" numpy==2.4.6 pyarrow==26.0.1 pandas==3.1.1
    RAY_VENV=/work/ray-venv .venv/bin/python benchmarks/peer_ray.py             # 256 images, 2 rounds

`--ray-actors N` runs N actors of `--ray-cpus` CPUs each (default: one actor with every CPU, as
imagebatch runs one engine per machine); each actor uses as many torch threads as its CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def emit(**rec: Any) -> None:
    print(json.dumps(rec), flush=True)


def job_yaml(n: int, size: int, steps: int, batch: int, out: str) -> str:
    prompts = "\n".join(f"    - a photo of object number {i}, studio light" for i in range(n))
    return f"""apiVersion: imagebatch.dev/v1alpha1
kind: ImageBatchJob
metadata:
  name: peer-ray
spec:
  model:
    name: builtin:tiny
  prompts:
{prompts}
  generation:
    width: {size}
    height: {size}
    steps: {steps}
    guidanceScale: 7.5
    seed: 1234
  batching:
    batchSize: {batch}
  output:
    uri: {out}
    format: png
"""


# -- the Ray side (runs in the Ray environment) ------------------------------------------------
class TinyGenerator:
    """Ray Data's callable class: the pipeline is loaded once per actor, in __init__."""

    def __init__(self, site_dirs: list[str], out: str, threads: int) -> None:
        import site

        for d in site_dirs:  # torch, diffusers and imagebatch from the project's environment
            site.addsitedir(d)
        import torch

        from imagebatch.worker.tiny import build_tiny_pipeline

        torch.set_num_threads(threads)
        self.torch = torch
        self.pipe = build_tiny_pipeline()
        self.pipe.set_progress_bar_config(disable=True)
        self.out = out
        os.makedirs(out, exist_ok=True)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        torch = self.torch
        with torch.inference_mode():
            images = self.pipe(
                prompt=[str(p) for p in batch["prompt"]],
                num_inference_steps=int(batch["steps"][0]),
                guidance_scale=float(batch["guidance"][0]),
                height=int(batch["size"][0]),
                width=int(batch["size"][0]),
                generator=[torch.Generator("cpu").manual_seed(int(s)) for s in batch["seed"]],
                output_type="pil",
            ).images
        paths = []
        for item_id, im in zip(batch["id"], images, strict=True):
            path = os.path.join(self.out, f"{item_id}.png")
            im.save(path, format="PNG")
            paths.append(path)
        return {"path": np.array(paths)}


def ray_child(a: argparse.Namespace) -> None:
    import ray

    rows = json.loads(Path(a.items).read_text())
    cpus = len(os.sched_getaffinity(0))
    per_actor = a.ray_cpus or max(1, cpus // a.ray_actors)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    site_dirs = [d for d in a.site_dirs.split(os.pathsep) if d]
    t0 = time.perf_counter()
    ds = ray.data.from_items(rows).map_batches(
        TinyGenerator,
        fn_constructor_args=(site_dirs, a.out, per_actor),
        batch_size=a.batch,
        concurrency=a.ray_actors,
        num_cpus=per_actor,
        batch_format="numpy",
    )
    written = sum(len(b["path"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
    secs = time.perf_counter() - t0
    assert written == len(rows), f"Ray wrote {written} of {len(rows)}"
    print(
        "RAY_RESULT " + json.dumps({"seconds": secs, "written": written, "ray": ray.__version__}), flush=True
    )
    ray.shutdown()


# -- the driver (runs in the project's environment) --------------------------------------------
def project_site_dirs() -> list[str]:
    import site

    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def run_imagebatch(a: argparse.Namespace, work: Path, r: int) -> float:
    out = work / f"ib-{r}"
    job = work / f"job-{r}.yaml"
    job.write_text(job_yaml(a.images, a.size, a.steps, a.batch, str(out)))
    exe = Path(sys.executable).with_name("imagebatch")
    t0 = time.perf_counter()
    p = subprocess.run([str(exe), "run", str(job), "--no-progress"], capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"imagebatch run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    written = len(list((out / "images").glob("*.png")))
    assert written == a.images, f"imagebatch wrote {written} of {a.images}"
    shutil.rmtree(out, ignore_errors=True)
    return secs


def run_ray(a: argparse.Namespace, work: Path, r: int, items: Path) -> tuple[float, float, str]:
    out = work / f"ray-{r}"
    cmd = [
        str(Path(a.ray_venv) / "bin" / "python"),
        __file__,
        "--ray-child",
        "--items",
        str(items),
        "--out",
        str(out),
        "--batch",
        str(a.batch),
        "--ray-actors",
        str(a.ray_actors),
        "--ray-cpus",
        str(a.ray_cpus),
        "--site-dirs",
        os.pathsep.join(project_site_dirs()),
    ]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    whole = time.perf_counter() - t0
    line = next((x for x in p.stdout.splitlines() if x.startswith("RAY_RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"the Ray run failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    res = json.loads(line.removeprefix("RAY_RESULT "))
    written = len(list(out.glob("*.png")))
    assert written == a.images, f"Ray wrote {written} of {a.images}"
    shutil.rmtree(out, ignore_errors=True)
    return float(res["seconds"]), whole, str(res["ray"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ray-venv", default=os.environ.get("RAY_VENV", "/work/ray-venv"))
    ap.add_argument("--ray-actors", type=int, default=1, help="Ray actors (each loads the pipeline)")
    ap.add_argument("--ray-cpus", type=int, default=0, help="CPUs per actor (0: all CPUs / actors)")
    # The child process run in the Ray environment.
    ap.add_argument("--ray-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--items", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--site-dirs", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ray_child:
        ray_child(a)
        return
    if not (Path(a.ray_venv) / "bin" / "python").exists():
        raise SystemExit(f"no Ray environment at {a.ray_venv}: make it as this script's docstring says")

    from imagebatch.api import Generation, PromptItem
    from imagebatch.planning import expand_items

    gen = Generation(width=a.size, height=a.size, steps=a.steps, guidance_scale=7.5, seed=1234)
    items = expand_items(
        [PromptItem(prompt=f"a photo of object number {i}, studio light") for i in range(a.images)], gen
    )
    work = Path(tempfile.mkdtemp(prefix="imagebatch-peer-ray-"))
    items_file = work / "items.json"
    # The seeds the job's items get, so both make the same images.
    items_file.write_text(
        json.dumps(
            [
                {"id": it.id, "prompt": it.prompt, "seed": it.seed, "steps": it.steps, "size": it.width}
                | {"guidance": it.guidance_scale}
                for it in items
            ]
        )
    )
    emit(
        event="env",
        images=a.images,
        size=a.size,
        steps=a.steps,
        batch=a.batch,
        cpus=len(os.sched_getaffinity(0)),
        ray_actors=a.ray_actors,
        ray_cpus_per_actor=a.ray_cpus or max(1, len(os.sched_getaffinity(0)) // a.ray_actors),
        load=os.getloadavg(),
    )
    samples: dict[str, list[float]] = {"imagebatch": [], "ray": []}
    ray_version = ""
    for r in range(a.rounds):
        for mode in ("imagebatch", "ray") if r % 2 == 0 else ("ray", "imagebatch"):
            load = os.getloadavg()[0]
            if mode == "imagebatch":
                secs = run_imagebatch(a, work, r)
                emit(event="run", round=r, mode=mode, seconds=round(secs, 3), load1=load)
            else:
                secs, whole, ray_version = run_ray(a, work, r, items_file)
                emit(
                    event="run",
                    round=r,
                    mode=mode,
                    seconds=round(secs, 3),
                    whole_process_seconds=round(whole, 3),
                    load1=load,
                )
            samples[mode].append(secs)
    shutil.rmtree(work, ignore_errors=True)
    best = {m: a.images / min(s) for m, s in samples.items()}
    emit(
        event="result",
        ray=ray_version,
        imagebatch_images_per_s=round(best["imagebatch"], 3),
        ray_images_per_s=round(best["ray"], 3),
        imagebatch_vs_ray=round(best["imagebatch"] / best["ray"], 3),
        rounds={m: [round(a.images / x, 3) for x in s] for m, s in samples.items()},
        load=os.getloadavg(),
    )


if __name__ == "__main__":
    main()
