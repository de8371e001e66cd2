"""Opt-in speed-ups applied to a loaded pipeline once, before the first batch.

channels-last and fused QKV projections are cheap and exact up to rounding. torch.compile costs
minutes per batch shape on a large UNet, so it is opt-in, the engine pads batches to one fixed
shape on CUDA, and the inductor caches live in a folder that can be a volume: a restarted worker
reads compiled kernels from there instead of compiling again.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, cast

import torch

from imagebatch.api import EngineSpec
from imagebatch.worker.pipeline import LoadedPipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Optimizations:
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: bool = False
    compile_cache: str | None = None  # a folder; on a volume it outlives the pod
    compile_batch: int | None = None  # the one batch shape compiled for (informational)


def set_compile_cache(folder: str) -> None:
    """Point inductor's persistent caches (FX graphs, autotuning, Triton kernels) at `folder`."""
    os.makedirs(folder, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def optimize(loaded: LoadedPipeline, opts: Optimizations) -> None:
    pipe = loaded.pipe
    t0 = time.perf_counter()
    applied: list[str] = []
    if opts.fuse_qkv and hasattr(pipe, "fuse_qkv_projections"):
        pipe.fuse_qkv_projections()
        applied.append("fused QKV")
    if opts.channels_last:
        for name in ("unet", "vae", "transformer"):
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                # torch's stubs lack Module.to(memory_format=...), which it has had since 1.5.
                cast(Any, module).to(memory_format=torch.channels_last)
        applied.append("channels-last")
    if opts.compile:
        if opts.compile_cache:
            set_compile_cache(opts.compile_cache)
        # dynamic=False: one graph per shape; the engine keeps the batch shape fixed.
        denoiser = "unet" if hasattr(pipe, "unet") else "transformer"
        setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser), fullgraph=True, dynamic=False))
        pipe.vae.decode = torch.compile(pipe.vae.decode, fullgraph=True, dynamic=False)
        applied.append(
            f"torch.compile of the {denoiser} and VAE decoder (cache: {opts.compile_cache or 'default'})"
        )
    if applied:
        log.info(
            "optimisations: %s (%.1fs; compilation happens at the first batch)",
            ", ".join(applied),
            time.perf_counter() - t0,
        )


def from_spec(loaded: LoadedPipeline, spec: EngineSpec, batch: int | None) -> Optimizations:
    """The job's engine settings for this device: layout and fusion pay off on CUDA only."""
    cuda = loaded.device.type == "cuda"
    return Optimizations(
        channels_last=spec.channels_last and cuda,
        fuse_qkv=spec.fuse_qkv and cuda,
        compile=spec.compile,
        compile_cache=spec.compile_cache_dir,
        compile_batch=batch,
    )


def batch_memory_path(spec: EngineSpec) -> str | None:
    """Where automatic batch sizes are remembered: beside the compile cache, so on the same volume."""
    return os.path.join(spec.compile_cache_dir, "batch-sizes.json") if spec.compile_cache_dir else None
