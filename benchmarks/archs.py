"""Random-weights pipelines of real architectures, as in shared/bench/baseline_diffusers.py.

Throughput depends on the architecture, not on the weights, so these give real costs with no
download. A byte-level CLIP tokenizer is attached so the engine can take text prompts.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from imagebatch.worker.tiny import _byte_vocab

SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SIZES = {"tiny": 64, "sd15": 512, "sdxl": 1024}


def _vae(sample: int, blocks: tuple[int, ...]) -> Any:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        block_out_channels=blocks,
        sample_size=sample,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
    )


def _clip(hidden: int, layers: int, heads: int, proj: int | None = None) -> Any:
    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        vocab_size=49408,
        projection_dim=proj or hidden,
    )
    return CLIPTextModelWithProjection(cfg) if proj else CLIPTextModel(cfg)


def _tokenizer() -> Any:
    vocab, merges = _byte_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok


def build(arch: str) -> Any:
    torch.manual_seed(0)
    sched = EulerDiscreteScheduler(**SCHED)
    if arch == "tiny":
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
        )
        return StableDiffusionPipeline(
            vae=_vae(64, (32, 64)),
            text_encoder=_clip(32, 2, 4),
            tokenizer=_tokenizer(),
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if arch == "sd15":
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        return StableDiffusionPipeline(
            vae=_vae(512, (128, 256, 512, 512)),
            text_encoder=_clip(768, 12, 12),
            tokenizer=_tokenizer(),
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if arch == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        return StableDiffusionXLPipeline(
            vae=_vae(1024, (128, 256, 512, 512)),
            text_encoder=_clip(768, 12, 12),
            text_encoder_2=_clip(1280, 32, 20, proj=1280),
            tokenizer=_tokenizer(),
            tokenizer_2=_tokenizer(),
            unet=unet,
            scheduler=sched,
        )
    raise SystemExit(f"unknown arch {arch!r}: use tiny, sd15 or sdxl")
