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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


@dataclass(frozen=True)
class TinySize:
    """Widths of a tiny pipeline: image side, VAE / UNet channels, text width and depth."""

    image_size: int
    vae_channels: tuple[int, int]
    unet_channels: tuple[int, int]
    text_width: int
    text_layers: int
    text_heads: int
    norm_groups: int
    max_length: int


SIZES = {
    # The reference tiny pipeline of the docstring above (tests of the core, benchmarks).
    "reference": TinySize(64, (16, 32), (32, 64), 32, 2, 4, 8, 16),
    # Its architecture shrunk to 16×16 images / 4×8×8 latents, for tests that train (agents, reproduction).
    "micro": TinySize(16, (8, 16), (16, 32), 16, 1, 2, 4, 8),
}


def tiny_text_config(tokenizer: Any, size: TinySize, **extra: Any) -> Any:
    """A ``CLIPTextConfig`` of ``size``'s width and depth for ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_width,
        intermediate_size=2 * size.text_width,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_vae(size: TinySize, **extra: Any) -> Any:
    """An ``AutoencoderKL`` with one downsampling (latents 4 × image_size/2 × image_size/2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=size.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=size.norm_groups,
        sample_size=size.image_size,
        **extra,
    )


def build_reference_tiny_pipeline(
    save_directory: str | os.PathLike[str],
    seed: int = 0,
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
    size: Literal["reference", "micro"] = "reference",
) -> Path:
    """Build the reference tiny pipeline and save it as a diffusers pipeline folder.

    Args:
        save_directory: Folder to write (``StableDiffusionPipeline.save_pretrained`` layout).
        seed: Seed of the random weights.
        prediction_type: The scheduler's (and so the policy's) prediction type.
        size: ``"reference"`` (64×64 images, see the module docstring) or ``"micro"`` (the same architecture
            at 16×16, for tests that train).

    Returns:
        The folder, loadable with ``load_components`` or ``StableDiffusionPipeline.from_pretrained``.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    dims = SIZES[size]
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(REFERENCE_WORDS, model_max_length=dims.max_length)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, dims))
    vae = tiny_vae(dims)
    unet = UNet2DConditionModel(
        sample_size=dims.image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=dims.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=dims.text_width,
        attention_head_dim=8,
        norm_num_groups=dims.norm_groups,
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


def build_reference_tiny_sdxl_pipeline(save_directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build a tiny pipeline with Stable Diffusion XL's structure and save it as a diffusers folder.

    What makes it SDXL: two text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, whose
    penultimate hidden states are concatenated: cross-attention width 32 + 32 = 64), the second encoder's
    pooled projection (width 32) and the six size/crop "time ids" fed to the UNet's ``text_time`` additional
    embedding (``addition_time_embed_dim=8``: 6 · 8 + 32 = 80 inputs), SDXL's scheduler config (an
    ``EulerDiscreteScheduler`` with ``timestep_spacing="leading"``, which the MDP reads as DDIM), and
    ``force_zeros_for_empty_prompt=True``. Images 64×64, latents 4×32×32, random weights.

    Returns:
        The folder, loadable with ``load_components`` or ``StableDiffusionXLPipeline.from_pretrained``.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    dims = SIZES["reference"]
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(REFERENCE_WORDS, model_max_length=dims.max_length)
    tokenizer_2 = build_word_tokenizer(REFERENCE_WORDS, model_max_length=dims.max_length)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, dims))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer, dims, projection_dim=32))
    vae = tiny_vae(dims, scaling_factor=0.13025)  # SDXL's VAE scaling
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        transformer_layers_per_block=(1, 1),
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        **{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "clip_sample")},
        timestep_spacing="leading",
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    path = Path(save_directory)
    pipeline.save_pretrained(path)
    # SDXL base's published scheduler_config.json also carries DDIM's keys (clip_sample, set_alpha_to_one:
    # false), which EulerDiscreteScheduler does not save: add them as the real file has them.
    config_path = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    config_path.write_text(json.dumps(config, indent=2))
    return path


def build_word_t5_tokenizer(words: tuple[str, ...] = REFERENCE_WORDS, model_max_length: int = 16) -> Any:
    """A T5 tokenizer (unigram, ``tokenizer.json`` only: no sentencepiece) whose words are single tokens."""
    import string

    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + word, -1.0) for word in dict.fromkeys(words)]
    vocab += [(char, -5.0) for char in string.ascii_lowercase + string.digits + "▁"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5(tokenizer: Any, width: int) -> Any:
    """A one-layer ``T5EncoderModel`` of ``width`` for ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=width, d_ff=2 * width, d_kv=width // 2, num_layers=1, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def build_reference_tiny_sd3_pipeline(save_directory: str | os.PathLike[str], seed: int = 0, t5: bool = True) -> Path:
    """Build a tiny pipeline with Stable Diffusion 3's structure and save it as a diffusers folder.

    What makes it SD3: an ``SD3Transformer2DModel`` (MMDiT, patch 2) on 16-channel latents; CLIP-L and CLIP-G
    stand-ins (two ``CLIPTextModelWithProjection`` of width 16, projections 16 + 16 = the pooled width 32), whose
    penultimate states (16 + 16) are padded to the joint width 48 of a T5 stand-in (``T5EncoderModel``, or
    none with ``t5=False``, as diffusers allows); SD3's VAE scaling and shift factors; a
    ``FlowMatchEulerDiscreteScheduler`` with shift 3. Images 16×16, latents 16×8×8, random weights.

    Returns:
        The folder, loadable with ``load_components`` or ``StableDiffusion3Pipeline.from_pretrained``.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    dims = SIZES["micro"]
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(REFERENCE_WORDS, model_max_length=dims.max_length)
    tokenizer_2 = build_word_tokenizer(REFERENCE_WORDS, model_max_length=dims.max_length)
    text_encoder = CLIPTextModelWithProjection(tiny_text_config(tokenizer, dims, projection_dim=16))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, dims, projection_dim=16))
    tokenizer_3 = build_word_t5_tokenizer() if t5 else None
    text_encoder_3 = tiny_t5(tokenizer_3, 48) if t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=16,
        pos_embed_max_size=8,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=dims.vae_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=dims.norm_groups,
        sample_size=dims.image_size,
        scaling_factor=1.5305,  # SD3's
        shift_factor=0.0609,
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    path = Path(save_directory)
    pipeline.save_pretrained(path)
    return path


def build_reference_tiny_flux_pipeline(
    save_directory: str | os.PathLike[str], seed: int = 0, guidance_embeds: bool = True
) -> Path:
    """Build a tiny pipeline with FLUX.1's structure and save it as a diffusers folder.

    What makes it FLUX: a ``FluxTransformer2DModel`` (one double- and one single-stream block, rotary axes
    4 + 6 + 6) on 2×2-packed 16-channel latents (64 features a token), the guidance embedding of FLUX.1-dev
    (``guidance_embeds=False``: schnell), a ``CLIPTextModel`` whose pooled output (16) is the pooled projection
    and a T5 stand-in (width 32) for the token embeddings, FLUX's VAE factors without quant convs, and the
    dynamically shifted ``FlowMatchEulerDiscreteScheduler``. Images 16×16, latents 16×8×8, random weights.

    Returns:
        The folder, loadable with ``load_components`` or ``FluxPipeline.from_pretrained``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    dims = SIZES["micro"]
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(REFERENCE_WORDS, model_max_length=dims.max_length)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, dims))
    tokenizer_2 = build_word_t5_tokenizer()
    text_encoder_2 = tiny_t5(tokenizer_2, 32)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=dims.text_width,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=dims.vae_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=dims.norm_groups,
        sample_size=dims.image_size,
        scaling_factor=0.3611,  # FLUX.1's
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    path = Path(save_directory)
    pipeline.save_pretrained(path)
    return path
