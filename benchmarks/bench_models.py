"""The three models the speed benchmarks run on, built from configs (random weights, no download).

- ``reference``: the reference tiny pipeline (``diffusion_mdp.testing``): latents 4×32×32, its one
  cross-attention block at the *higher* resolution (32×32 = 1024 tokens), so attention dominates.
- ``tiny-shapes``: the bundled model users run: latents 4×16×16, cross-attention at 4×4 only.
- ``sd-lowattn``: a tiny Stable Diffusion pipeline laid out like SD's own UNet, where the highest-resolution
  stage has no attention: latents 4×32×32, ``DownBlock2D`` at 32×32 and ``CrossAttnDownBlock2D`` at 16×16.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

MODELS = ("reference", "tiny-shapes", "sd-lowattn")
PROMPTS = {"reference": "imagenet_animals", "tiny-shapes": "shapes_train", "sd-lowattn": "imagenet_animals"}


def build_low_attention_pipeline(save_directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """A tiny SD pipeline whose attention sits only at the lower resolution (16×16 of 32×32 latents)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffusion_mdp.testing import REFERENCE_WORDS, SD_SCHEDULER_CONFIG, SIZES, tiny_text_config, tiny_vae
    from diffusion_mdp.tokenizer import build_word_tokenizer

    dims = SIZES["reference"]
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(REFERENCE_WORDS, model_max_length=dims.max_length)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=dims.text_width,
        attention_head_dim=8,
        norm_num_groups=dims.norm_groups,
    )
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(dims),
        text_encoder=CLIPTextModel(tiny_text_config(tokenizer, dims)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = Path(save_directory)
    pipeline.save_pretrained(path)
    return path


def build_model(name: str, folder: str | os.PathLike[str]) -> str:
    """The model argument for ``name`` (building its pipeline under ``folder`` where needed)."""
    from diffusion_mdp.testing import build_reference_tiny_pipeline

    if name == "tiny-shapes":
        return "tiny-shapes"
    if name == "reference":
        return str(build_reference_tiny_pipeline(Path(folder) / "reference"))
    if name == "sd-lowattn":
        return str(build_low_attention_pipeline(Path(folder) / "sd-lowattn"))
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
