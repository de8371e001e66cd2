"""Loading a diffusers text-to-image pipeline once per process, with errors that say what to change.

Transient hub errors (429 rate limits, 5xx, timeouts, dropped connections) are retried with
jittered exponential backoff (tenacity); if they outlast the retries they end the process with
TransientHubError, which the Job retries with a new pod, never with a ModelLoadError (that fails
the whole job). `fetch_model` fills a Hugging Face cache (the fetch init container of
spec.model.cache) and makes no hub request when the cache already holds the model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from imagebatch.api import BUILTIN_PREFIX, ModelSpec
from imagebatch.errors import ModelLoadError

log = logging.getLogger(__name__)

T = TypeVar("T")

# HTTP statuses worth another try: timeouts, rate limits, server errors.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
HUB_ATTEMPTS = 8
HUB_WAIT_FIRST = 2.0  # seconds; the waits grow to HUB_WAIT_MAX, jittered so 64 pods spread out
HUB_WAIT_MAX = 60.0


class TransientHubError(RuntimeError):
    """The hub kept answering with transient errors: not the model's fault, so not a ModelLoadError."""


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_transient(err: BaseException) -> bool:
    """A rate limit, server error, timeout or dropped connection anywhere in the error's chain.

    diffusers wraps hub errors (an OSError "cannot find the requested files ... from" the
    HfHubHTTPError), so the chain is searched, not only the outer error."""
    import httpx
    from huggingface_hub.errors import OfflineModeIsEnabled

    chain = list(_chain(err))
    # Offline (HF_HUB_OFFLINE=1) is a ConnectionError too, but no retry can change it.
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return False
    for e in chain:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in TRANSIENT_STATUS:
            return True
        if isinstance(e, (httpx.TimeoutException, httpx.NetworkError, TimeoutError, ConnectionError)):
            return True
    return False


def with_hub_retries(what: str, fn: Callable[[], T]) -> T:
    def before_sleep(state: RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: transient hub error (%s: %s); attempt %d of %d, retrying in %.1fs",
            what,
            type(err).__name__,
            str(err).splitlines()[0] if err and str(err) else "",
            state.attempt_number,
            HUB_ATTEMPTS,
            state.next_action.sleep if state.next_action else 0.0,
        )

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(HUB_ATTEMPTS),
        wait=wait_random_exponential(multiplier=HUB_WAIT_FIRST, max=HUB_WAIT_MAX),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(fn)
    except Exception as e:
        if is_transient(e):
            raise TransientHubError(
                f"{what}: the hub kept failing after {HUB_ATTEMPTS} attempts ({type(e).__name__}); "
                "the pod exits and the Job starts another. Set spec.model.cache so that one fetch "
                "step downloads the model for every worker."
            ) from e
        raise


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
    kwargs: dict[str, Any] = {"revision": spec.revision, "torch_dtype": dtype}
    if spec.variant:
        kwargs["variant"] = spec.variant
    try:
        return with_hub_retries(f"loading {spec.name}", lambda: cls.from_pretrained(name, **kwargs))
    except (ModelLoadError, TransientHubError):
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
            + (f" with variant {spec.variant!r}" if spec.variant else "")
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


def fetch_model(spec: ModelSpec) -> str:
    """Download what the pipeline needs into the Hugging Face cache (HF_HOME); return its folder.

    A cache that holds the model already is found with no hub request at all, so re-running the
    fetch step of every pod costs nothing once one of them filled it."""
    import diffusers

    kwargs: dict[str, Any] = {"revision": spec.revision}
    if spec.variant:
        kwargs["variant"] = spec.variant
    cls: Any = diffusers.DiffusionPipeline
    try:
        folder: str = cls.download(spec.name, local_files_only=True, **kwargs)
        log.info("%s is in the cache already: %s", spec.name, folder)
        return folder
    except Exception:
        pass  # not (fully) cached: download below
    try:
        folder = with_hub_retries(f"fetching {spec.name}", lambda: cls.download(spec.name, **kwargs))
    except TransientHubError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"spec.model.name: cannot fetch model {spec.name!r}"
            + (f" at revision {spec.revision!r}" if spec.revision else "")
            + (f" with variant {spec.variant!r}" if spec.variant else "")
            + f": {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Check the repo id, revision and variant, and spec.model.tokenSecretRef for gated models"
        ) from None
    log.info("fetched %s into %s", spec.name, folder)
    return folder
