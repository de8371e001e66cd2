"""Prompt preparation off the denoising loop: tokenise and text-encode a batch ahead of its turn.

The engine (each of its lanes on the CPU) asks for batch k+1's embeddings while batch k denoises
(a thread; on CUDA the work is queued on a side stream so it overlaps the UNet's kernels). Each distinct negative prompt is
encoded once per worker and then reused, since a job usually has one negative prompt for all of
its images. A prompt with more tokens than the text encoder reads is flagged, so the manifest can
say that the image was made from a cut prompt.

Pipelines of the Stable Diffusion 1.x/2.x family (one CLIP text encoder, `encode_prompt` and
`prompt_embeds` / `negative_prompt_embeds` in `__call__`) get embeddings; any other pipeline
(SDXL has two encoders and pooled embeddings) is given the prompt strings as before.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from imagebatch.planning import Item

log = logging.getLogger(__name__)

# Distinct negative prompts kept per worker; a job with a negative prompt per image must not
# hold them all in memory.
NEGATIVE_CACHE_SIZE = 1024


@dataclass
class TextStats:
    """What text preparation cost. `wait_seconds` is the part the denoising loop waited for."""

    encoder_calls: int = 0  # calls of the text encoder made for prepared batches
    rows: int = 0  # sequences encoded
    encode_seconds: float = 0.0  # time spent encoding, in whichever thread did it
    wait_seconds: float = 0.0  # time the engine's loop was blocked on text preparation
    negative_hits: int = 0
    truncated: int = 0


@dataclass
class Prepared:
    """One batch's text inputs for `pipe(...)`: embeddings, or the prompt strings as a fallback."""

    kwargs: dict[str, Any]
    truncated: list[bool]
    ready: torch.cuda.Event | None = None
    seconds: float = 0.0

    def wait(self) -> None:
        """Make the current CUDA stream wait for the side stream's encoding (no host sync)."""
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)


@dataclass
class TextPreparer:
    pipe: Any
    device: torch.device
    stats: TextStats = field(default_factory=TextStats)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._negatives: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._pending: dict[str, Future[torch.Tensor]] = {}
        # A tokenizer is not thread-safe (a fast one sets its padding and truncation per call), and
        # lanes share this preparer: one tokenisation or encoding at a time.
        self._tokenizing = threading.Lock()
        params = inspect.signature(self.pipe.__call__).parameters
        self.takes_negative = "negative_prompt" in params
        encode = getattr(self.pipe, "encode_prompt", None)
        self.embeds = (
            encode is not None
            and "prompt_embeds" in params
            and (not self.takes_negative or "negative_prompt_embeds" in params)
            and "do_classifier_free_guidance" in inspect.signature(encode).parameters
            and getattr(self.pipe, "text_encoder_2", None) is None
            and getattr(self.pipe, "text_encoder", None) is not None
        )
        tok = getattr(self.pipe, "tokenizer", None)
        self.tokenizer = tok
        self.limit: int | None = int(tok.model_max_length) if tok is not None else None
        self.stream = (
            torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            if self.device.type == "cuda" and self.embeds
            else None
        )

    # -- truncation ---------------------------------------------------------------------------
    def truncated(self, prompts: Sequence[str]) -> list[bool]:
        """True where a prompt has more tokens (with start and end) than the encoder reads."""
        if self.tokenizer is None or self.limit is None or not prompts:
            return [False] * len(prompts)
        with self._tokenizing:
            ids = self.tokenizer(list(prompts), truncation=False).input_ids
        return [len(x) > self.limit for x in ids]

    # -- encoding -----------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> torch.Tensor:
        t0 = time.perf_counter()
        with self._tokenizing:
            embeds: torch.Tensor = self.pipe.encode_prompt(texts, self.device, 1, False)[0]
        with self._lock:
            self.stats.encoder_calls += 1
            self.stats.rows += len(texts)
            self.stats.encode_seconds += time.perf_counter() - t0
        return embeds

    def _negative(self, text: str) -> torch.Tensor:
        with self._lock:
            hit = self._negatives.get(text)
            if hit is not None:
                self._negatives.move_to_end(text)
                self.stats.negative_hits += 1
                return hit
            # Lanes ask for the same new text at once: one encodes it, the others wait for it.
            pending = self._pending.get(text)
            mine = pending is None
            if pending is None:
                pending = self._pending[text] = Future()
            else:
                self.stats.negative_hits += 1
        if not mine:
            return pending.result()
        try:
            embeds = self._encode([text])
        except BaseException as e:
            with self._lock:
                del self._pending[text]
            pending.set_exception(e)
            raise
        with self._lock:
            self._negatives[text] = embeds
            del self._pending[text]
            while len(self._negatives) > NEGATIVE_CACHE_SIZE:
                self._negatives.popitem(last=False)
        pending.set_result(embeds)
        return embeds

    def prepare(self, batch: Sequence[Item]) -> Prepared:
        """The text inputs of one (already padded) batch; safe to call from another thread."""
        t0 = time.perf_counter()
        prompts = [it.prompt for it in batch]
        cut = self.truncated(prompts)
        for it, c in zip(batch, cut, strict=True):
            if c:
                log.warning(
                    "item %s: the prompt is longer than the %d tokens the text encoder reads; the rest is "
                    "ignored (truncated: true in the manifest). Shorten it to keep every word: %.60r...",
                    it.id,
                    self.limit,
                    it.prompt,
                )
        if not self.embeds:
            kwargs: dict[str, Any] = {"prompt": prompts}
            if self.takes_negative:
                kwargs["negative_prompt"] = [it.negative_prompt for it in batch]
            return Prepared(kwargs, cut, seconds=time.perf_counter() - t0)
        ready = None
        side = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), side:
            kwargs = {"prompt_embeds": self._encode(prompts)}
            # Negative prompts matter only with classifier-free guidance (scale > 1).
            if self.takes_negative and batch[0].guidance_scale > 1:
                kwargs["negative_prompt_embeds"] = torch.cat(
                    [self._negative(it.negative_prompt) for it in batch]
                )
            if self.stream is not None:
                ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
                ready.record(self.stream)
                # The denoising stream uses these tensors: keep the allocator from reusing them early.
                for t in kwargs.values():
                    t.record_stream(torch.cuda.default_stream(self.device))
        return Prepared(kwargs, cut, ready, time.perf_counter() - t0)
