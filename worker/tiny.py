"""`builtin:tiny`: a real Stable Diffusion pipeline with small random weights, built in-process.

It exercises every part of the engine (tokenizer, text encoder, UNet, scheduler, VAE) with no
download, so demos and tests run offline on a CPU. Weights come from a fixed seed, so the same
prompt and seed give the same image on every machine with the same torch build.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

WEIGHTS_SEED = 20261126
# 8/16-channel blocks: about 90 images/s per CPU core at 32x32 in batches of 32.
_CH = (8, 16)
_TEXT_DIM = 16


def _byte_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's byte-level alphabet with no merges: every character is a token. Small and offline."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, []


def build_tiny_pipeline() -> StableDiffusionPipeline:
    vocab, merges = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 77
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(WEIGHTS_SEED)
    try:
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=_TEXT_DIM,
                intermediate_size=_TEXT_DIM * 2,
                num_attention_heads=2,
                num_hidden_layers=1,
                max_position_embeddings=77,
                vocab_size=len(vocab),
                projection_dim=_TEXT_DIM,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        )
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=_CH,
            layers_per_block=1,
            norm_num_groups=8,
            # Attention only at the coarser level: it dominates CPU time at full latent size.
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=_TEXT_DIM,
            attention_head_dim=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            block_out_channels=_CH,
            sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * len(_CH),
            up_block_types=("UpDecoderBlock2D",) * len(_CH),
            mid_block_add_attention=False,
        )
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


BUILTINS: dict[str, Callable[[], Any]] = {"tiny": build_tiny_pipeline}
