"""Loading a diffusers text-to-image pipeline once per process, with errors that say what to change."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from imagebatch.api import BUILTIN_PREFIX, ModelSpec
from imagebatch.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass
class LoadedPipeline:
    pipe: Any  # a diffusers DiffusionPipeline
    device: torch.device
    dtype: torch.dtype
    model: str
    revision: str | None
    pipeline_class: str
    scheduler_class: str
    load_seconds: float


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: no CUDA device is visible here; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def _from_pretrained(spec: ModelSpec, dtype: torch.dtype) -> Any:
    import diffusers

    cls: Any = diffusers.DiffusionPipeline
    if spec.pipeline:
        cls = getattr(diffusers, spec.pipeline, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ModelLoadError(
                f"spec.model.pipeline: diffusers has no pipeline class {spec.pipeline!r}; "
                "leave it unset to use the model's own (from model_index.json)"
            )
    name = os.path.expanduser(spec.name)
    if _looks_like_path(name):
        if not os.path.isdir(name):
            raise ModelLoadError(f"spec.model.name: model directory {spec.name!r} does not exist")
        if not os.path.exists(os.path.join(name, "model_index.json")):
            raise ModelLoadError(
                f"spec.model.name: {spec.name!r} has no model_index.json; point it at a diffusers "
                "pipeline folder (one saved with save_pretrained, or a snapshot of a Hugging Face repo)"
            )
    try:
        return cls.from_pretrained(name, revision=spec.revision, torch_dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers and huggingface_hub raise many types for "not found"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "HF_HUB_OFFLINE=1 is set, so only the local cache is searched; "
            if offline
            else "check the repo id and revision, HF_TOKEN for gated models, and network access; "
        )
        raise ModelLoadError(
            f"spec.model.name: cannot load model {spec.name!r}"
            + (f" at revision {spec.revision!r}" if spec.revision else "")
            + f": {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            + hint
            + "a local directory with model_index.json or builtin:tiny also work"
        ) from None


def _set_scheduler(pipe: Any, name: str) -> None:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ModelLoadError(
            f"spec.model.scheduler: diffusers has no scheduler {name!r}; try EulerDiscreteScheduler, "
            "DPMSolverMultistepScheduler or DDIMScheduler, or leave it unset"
        )
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def load_pipeline(spec: ModelSpec, device: str = "auto") -> LoadedPipeline:
    t0 = time.perf_counter()
    dev = resolve_device(device)
    dtype = resolve_dtype(spec.dtype, dev)
    if spec.name.startswith(BUILTIN_PREFIX):
        from imagebatch.worker.tiny import BUILTINS

        builtin = spec.name.removeprefix(BUILTIN_PREFIX)
        if builtin not in BUILTINS:
            raise ModelLoadError(
                f"spec.model.name: unknown built-in model {spec.name!r}; built-ins are "
                + ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
            )
        pipe = BUILTINS[builtin]()
    else:
        pipe = _from_pretrained(spec, dtype)
    if spec.scheduler:
        _set_scheduler(pipe, spec.scheduler)
    pipe = pipe.to(dev, dtype)
    pipe.set_progress_bar_config(disable=True)
    loaded = LoadedPipeline(
        pipe=pipe,
        device=dev,
        dtype=dtype,
        model=spec.name,
        revision=spec.revision,
        pipeline_class=type(pipe).__name__,
        scheduler_class=type(pipe.scheduler).__name__,
        load_seconds=time.perf_counter() - t0,
    )
    log.info(
        "loaded %s (%s, %s) on %s as %s in %.1fs",
        spec.name,
        loaded.pipeline_class,
        loaded.scheduler_class,
        dev,
        str(dtype).removeprefix("torch."),
        loaded.load_seconds,
    )
    return loaded
