"""The *reference tiny pipeline*: a randomly initialised Stable Diffusion pipeline built from configs.

Tests and benchmarks need a model with Stable Diffusion's exact structure (AutoencoderKL, a
cross-attention UNet2DConditionModel, a CLIP text encoder and tokenizer, SD's DDIM scheduler config) but no
download. This module builds one, small enough to run on a laptop CPU:

- images 64×64, ``AutoencoderKL`` with latents 4×32×32,
- ``UNet2DConditionModel`` with ``block_out_channels=(32, 64)``, ``layers_per_block=1``,
  ``cross_attention_dim=32``,
- a 2-layer ``CLIPTextModel`` of width 32 and a word-level ``CLIPTokenizer`` built locally,
- Stable Diffusion v1's scheduler config (scaled-linear betas 0.00085–0.012, ``steps_offset=1``,
  ``set_alpha_to_one=False``), as a ``DDIMScheduler``.

Its weights are random (seeded), so its images are noise: use it for mechanics, shapes and speed, never
for quality.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from diffusion_mdp.tokenizer import build_word_tokenizer

REFERENCE_WORDS = (
    "a an the one two three four red green blue yellow orange purple white black circle circles square "
    "squares triangle triangles cat dog horse riding bike playing chess washing dishes"
).split()

SD_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


def build_reference_tiny_pipeline(
    save_directory: str | os.PathLike[str],
    seed: int = 0,
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
) -> Path:
    """Build the reference tiny pipeline and save it as a diffusers pipeline folder.

    Args:
        save_directory: Folder to write (``StableDiffusionPipeline.save_pretrained`` layout).
        seed: Seed of the random weights.
        prediction_type: The scheduler's (and so the policy's) prediction type.

    Returns:
        The folder, loadable with ``load_components`` or ``StableDiffusionPipeline.from_pretrained``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(REFERENCE_WORDS, model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = Path(save_directory)
    pipeline.save_pretrained(path)
    return path
