"""The engine against plain diffusers, in one run, on the same pipeline. Prints JSON lines.

Four ways to make the same images (same prompts, same seeds):
  single_loop    a loop of pipe(prompt) calls, one image each (what most scripts do);
  plain_batched  pipe([...]) over batches of --batch, PIL images returned, nothing written;
  engine_inline  the engine with text encoded inside each pipe(...) call, as before it prepared
                 prompts itself (embeds=False);
  engine         imagebatch's engine at the same batch size, every image encoded and written
                 to local disk, each distinct negative prompt encoded once, the next batch's text
                 encoded while this one denoises on CUDA, and on the CPU one lane of batches per
                 core (a fresh engine each round, as a new worker).
The last lines give the engine's ratios to the other two. `text` lines give, per mode, the text
encoder's calls and sequences and the share of wall time the denoising loop spent on (or waiting
for) text encoding; --negatives N gives the prompts N distinct negative prompts. On CUDA it also
reports the fraction of the engine's wall time the GPU was busy (from the profiler's kernel
timeline) and the model FLOP utilisation.

    python benchmarks/engine.py --arch tiny                     # CPU, about a minute
    python benchmarks/engine.py --arch tiny --images 256 --negatives 20
    python benchmarks/engine.py --arch sd15 --images 256 --batch 64
    python benchmarks/engine.py --arch sdxl --images 64 --batch 16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from archs import SIZES, build

from imagebatch.api import Generation, PromptItem
from imagebatch.planning import Item, expand_items
from imagebatch.storage import Storage
from imagebatch.worker.engine import Engine, EngineOptions, default_lanes
from imagebatch.worker.optimize import Optimizations, optimize
from imagebatch.worker.pipeline import LoadedPipeline

DEFAULTS = {  # steps, images, batch, single-loop images
    "tiny": (4, 32, 16, 8),
    "sd15": (20, 256, 64, 16),
    "sdxl": (20, 64, 16, 8),
}
# Dense fp16/bf16 tensor-core peak, for model FLOP utilisation.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


def emit(**rec: Any) -> None:
    print(json.dumps(rec), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def plain_call(pipe: Any, chunk: list[Item], output_type: str = "pil") -> Any:
    it = chunk[0]
    return pipe(
        prompt=[i.prompt for i in chunk],
        negative_prompt=[i.negative_prompt for i in chunk],
        num_inference_steps=it.steps,
        guidance_scale=it.guidance_scale,
        height=it.height,
        width=it.width,
        generator=[torch.Generator("cpu").manual_seed(i.seed) for i in chunk],
        output_type=output_type,
    ).images


class TextMeter:
    """Calls, sequences and seconds of the text encoder's forward, from module hooks.

    On CUDA the seconds are host time (kernel launches), not kernel time: read the calls there."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = self.rows = 0
        self.seconds = 0.0
        self._t0: dict[int, float] = {}
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module: Any, args: Any) -> None:
        import threading

        self._t0[threading.get_ident()] = time.perf_counter()

    def _post(self, module: Any, args: Any, out: Any) -> None:
        import threading

        self.calls += 1
        self.rows += int(args[0].shape[0]) if args else 0
        self.seconds += time.perf_counter() - self._t0.pop(threading.get_ident())

    def reset(self) -> None:
        self.calls = self.rows = 0
        self.seconds = 0.0


def flops_per_image(pipe: Any, item: Item) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        plain_call(pipe, [item], output_type="latent")
    return float(counter.get_total_flops())


def gpu_busy_fraction(fn: Callable[[], object]) -> float:
    """Union of CUDA kernel intervals over the wall time of fn, from the profiler's timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None and cur_s is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None and cur_s is not None:
        busy += cur_e - cur_s
    return min(1.0, busy / wall_us)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", choices=sorted(DEFAULTS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--images", type=int, help="images for plain_batched and engine")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--single-images", type=int, help="images for the single-prompt loop (it is slow)")
    ap.add_argument("--size", type=int, help="override the image size")
    ap.add_argument("--dtype", default="float16", help="on CUDA; the CPU always uses float32")
    ap.add_argument("--format", default="png", choices=["png", "webp", "jpeg"])
    ap.add_argument("--fast", action="store_true", help="channels-last and fused QKV for all three")
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet and VAE decoder (all three)"
    )
    ap.add_argument("--compile-cache", help="persistent compile cache folder")
    ap.add_argument("--out", help="where the engine writes (default: a temp folder, removed)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of plain_batched and engine")
    ap.add_argument("--no-profile", action="store_true", help="skip the GPU-busy measurement")
    ap.add_argument("--negatives", type=int, default=0, help="distinct negative prompts (0: none)")
    a = ap.parse_args()

    steps, n_images, batch, n_single = DEFAULTS[a.arch]
    steps, n_images, batch = a.steps or steps, a.images or n_images, a.batch or batch
    n_single = a.single_images or n_single
    size = a.size or SIZES[a.arch]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype) if device.type == "cuda" else torch.float32

    pipe = build(a.arch).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    loaded = LoadedPipeline(
        pipe, device, dtype, f"random:{a.arch}", None, type(pipe).__name__, type(pipe.scheduler).__name__, 0.0
    )
    t_opt = time.perf_counter()
    optimize(
        loaded,
        Optimizations(
            channels_last=a.fast,
            fuse_qkv=a.fast,
            compile=a.compile,
            compile_cache=a.compile_cache,
            compile_batch=batch,
        ),
    )
    gen = Generation(width=size, height=size, steps=steps, guidance_scale=7.5, seed=0)
    items = expand_items(
        [
            PromptItem(
                prompt=f"a photo of object number {i}, studio light",
                negative_prompt=f"blurry, low quality, style {i % a.negatives}" if a.negatives else None,
            )
            for i in range(n_images)
        ],
        gen,
    )
    warm = expand_items([PromptItem(prompt="warm up")] * 1, gen.model_copy(update={"steps": 2}))

    out_dir = a.out or tempfile.mkdtemp(prefix="imagebatch-bench-")
    emit(
        event="env",
        arch=a.arch,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        dtype=str(dtype).removeprefix("torch."),
        steps=steps,
        size=size,
        batch=batch,
        images=n_images,
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        encode_workers=EngineOptions().encode_workers,
        lanes=default_lanes(device),
        fast=a.fast,
        compile=a.compile,
        cpus=len(os.sched_getaffinity(0)),
        negatives=a.negatives,
        load=[round(x, 2) for x in os.getloadavg()],
    )

    # Warm-up at every shape each mode uses (and compile, if asked): not timed.
    t_warm = time.perf_counter()
    plain_call(pipe, warm * batch)
    plain_call(pipe, warm)
    sync(device)
    emit(
        event="warmup",
        seconds=round(time.perf_counter() - t_warm, 3),
        optimize_seconds=round(t_warm - t_opt, 3),
    )

    results: dict[str, float] = {}

    def record(mode: str, b: int, n: int, seconds: float, **extra: Any) -> None:
        results[mode] = n / seconds
        rec: dict[str, Any] = dict(
            event="throughput",
            mode=mode,
            batch=b,
            images=n,
            seconds=round(seconds, 3),
            images_per_s=round(n / seconds, 3),
        )
        if device.type == "cuda":
            rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        emit(**rec, **extra)

    single = items[:n_single]
    record("single_loop", 1, len(single), timed(device, lambda: [plain_call(pipe, [it]) for it in single]))
    chunks = [items[i : i + batch] for i in range(0, len(items), batch)]
    # Interleaved rounds, best of each: a shared machine's noise hits both modes alike.
    samples: dict[str, list[float]] = {"plain_batched": [], "engine_inline": [], "engine": []}
    meter = TextMeter(pipe.text_encoder)
    text: dict[str, list[dict[str, Any]]] = {mode: [] for mode in samples}

    def text_record(mode: str, seconds: float, critical: float) -> None:
        text[mode].append(
            dict(
                calls=meter.calls,
                rows=meter.rows,
                encoder_seconds=round(meter.seconds, 4),
                critical_seconds=round(critical, 4),
                wall_seconds=round(seconds, 3),
                share=round(critical / seconds, 4),
            )
        )

    for r in range(a.repeats):
        meter.reset()
        secs = timed(device, lambda: [plain_call(pipe, c) for c in chunks])
        samples["plain_batched"].append(secs)
        text_record("plain_batched", secs, meter.seconds)  # pipe(...) encodes on the critical path
        for mode, ahead in (("engine_inline", False), ("engine", True)):
            folder = os.path.join(out_dir, f"round{r}" + ("" if ahead else "-inline"))  # nothing to skip
            eng = Engine(
                loaded,
                Storage(folder),
                EngineOptions(batch_size=batch, image_format=a.format, embeds=ahead),
            )
            meter.reset()
            secs = timed(device, functools.partial(eng.run, items))
            samples[mode].append(secs)
            # Ahead: only the time the loop waited for embeddings is on the critical path.
            text_record(mode, secs, eng.text.stats.wait_seconds if ahead else meter.seconds)
            eng.close()
            written = len(list(Path(folder, "images").iterdir()))
            assert written == len(items), f"the engine wrote {written} of {len(items)} images"
    for mode, secs in samples.items():
        extra: dict[str, Any] = {"rounds_images_per_s": [round(len(items) / x, 3) for x in secs]}
        if mode == "engine":
            extra["writes"] = f"{a.format} files"
        record(mode, batch, len(items), min(secs), **extra)
    distinct_negatives = len({it.negative_prompt for it in items})
    for mode, secs in samples.items():
        best = text[mode][secs.index(min(secs))]
        emit(
            event="text",
            mode=mode,
            batches=len(chunks),
            distinct_negatives=distinct_negatives,
            **best,
            rounds_share=[t["share"] for t in text[mode]],
        )

    ratio = dict(
        engine_vs_plain_batched=round(results["engine"] / results["plain_batched"], 3),
        engine_vs_single_loop=round(results["engine"] / results["single_loop"], 3),
    )
    emit(event="ratio", **ratio, load=[round(x, 2) for x in os.getloadavg()])
    print(
        f"engine / plain batched {ratio['engine_vs_plain_batched']}, engine / single loop "
        f"{ratio['engine_vs_single_loop']} (best of {a.repeats} rounds; load {os.getloadavg()[0]:.1f})",
        file=sys.stderr,
    )
    flops = flops_per_image(pipe, items[0])
    gpu: dict[str, Any] = {"flops_per_image": flops}
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak:
            gpu["mfu"] = round(results["engine"] * flops / (peak * 1e12), 4)
            gpu["peak_tflops"] = peak
        if not a.no_profile:
            # A fresh output so that nothing is skipped; two batches are enough for the fraction.
            probe = Engine(
                loaded, Storage(tempfile.mkdtemp()), EngineOptions(batch_size=batch, image_format=a.format)
            )
            gpu["busy_fraction"] = round(gpu_busy_fraction(lambda: probe.run(items[: 2 * batch])), 4)
            probe.close()
    emit(event="gpu" if device.type == "cuda" else "flops", **gpu)
    if not a.out:
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
