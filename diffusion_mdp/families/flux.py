"""FLUX.1: ``FluxTransformer2DModel`` on packed latents, CLIP pooled + T5 prompts, embedded guidance.

What the policy does here is what ``FluxPipeline`` does (the tests compare with it):

- **Latents**: the MDP's state is the VAE latent ``(16, H/8, W/8)`` as the pipeline draws its noise; each call
  packs it into ``(H/16 · W/16, 64)`` tokens of 2×2 patches (``_pack_latents``) and unpacks the velocity. The
  SDE step is elementwise, so its log-probability is the same in either layout.
- **Prompts** (``encode_prompt``): T5's last hidden states (512 tokens) and CLIP's pooled output; text ids are
  zeros, image ids the patch coordinates. Packed: ``(B, 512 + 1, 4096)`` for FLUX.1-dev.
- **Guidance**: FLUX.1-dev is guidance-*distilled*: the guidance scale is an input of the network
  (``guidance``), there is no unconditional branch and no classifier-free guidance; FLUX.1-schnell
  (``guidance_embeds=False``) takes none. The policy's ``guidance_scale`` is that input (the pipeline's 3.5).
- **Schedule**: sigmas ``linspace(1, 1/T, T)`` shifted dynamically, μ from the image's token count.
- **Size**: the pipeline's default resolution is 128 latent pixels a side (1024 px); the VAE config's
  ``sample_size`` (1024 for FLUX.1) over the VAE factor gives the same, and sets it for other folders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusion_mdp.families import model_time, pack_pooled, unpack_pooled
from diffusion_mdp.flow import FlowMatchSchedule

SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
T5_MAX_LENGTH = 512  # the pipeline's default max_sequence_length


def load(load: Callable[..., Any], index: dict[str, Any], torch_dtype: torch.dtype) -> dict[str, Any]:
    """The pipeline's modules as :class:`~diffusion_mdp.models.DiffusionComponents` fields."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    return {
        "unet": load(FluxTransformer2DModel, "transformer", torch_dtype=torch_dtype),
        "vae": load(AutoencoderKL, "vae", torch_dtype=torch_dtype),
        "text_encoder": load(CLIPTextModel, "text_encoder", dtype=torch_dtype),
        "text_encoder_2": load(T5EncoderModel, "text_encoder_2", dtype=torch_dtype),
        "tokenizer": load(CLIPTokenizer, "tokenizer"),
        "tokenizer_2": load(AutoTokenizer, "tokenizer_2"),
        "scheduler": load(FlowMatchEulerDiscreteScheduler, "scheduler"),
    }


def latent_shape(components: Any) -> tuple[int, int, int]:
    """(C, H, W): ``in_channels / 4`` channels (2×2 packing), the VAE's ``sample_size`` over its factor a side."""
    factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    side = int(components.vae.config.sample_size) // factor
    side -= side % 2  # packing needs even sides, as the pipeline rounds them
    return (int(components.unet.config.in_channels) // 4, side, side)


def image_seq_len(components: Any) -> int:
    """Number of packed latent tokens (H/2 · W/2): what μ of the dynamic shift is interpolated from."""
    _, height, width = latent_shape(components)
    return (height // 2) * (width // 2)


def make_schedule(components: Any, num_steps: int, noise_level: float) -> FlowMatchSchedule:
    """The SDE schedule the pipeline uses: sigmas linspace(1, 1/T, T), dynamic shift μ(token count)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = components.scheduler.config
    mu = calculate_shift(
        image_seq_len(components),
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).tolist()
    return FlowMatchSchedule.from_scheduler(components.scheduler, num_steps, noise_level, mu=mu, sigmas=sigmas)


def encode(policy: Any, prompts: list[str]) -> Tensor:
    """``FluxPipeline.encode_prompt``, packed: ``(B, L_t5 + 1, D_t5)`` (the pooled CLIP output as the last row)."""
    components = policy.components
    clip, t5 = components.text_encoder, components.text_encoder_2
    clip_tokens = components.tokenizer(
        prompts,
        padding="max_length",
        max_length=components.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(clip.device)
    pooled = clip(clip_tokens, output_hidden_states=False).pooler_output
    t5_tokens = components.tokenizer_2(
        prompts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids.to(t5.device)
    hidden = t5(t5_tokens, output_hidden_states=False)[0]
    return pack_pooled(hidden, pooled.to(hidden.dtype))


def pack_latents(latents: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 · W/2, 4C)``: 2×2 patches as tokens (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`: ``(B, H/2 · W/2, 4C)`` -> ``(B, C, H, W)``."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(H/2 · W/2, 3)`` position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def forward(
    policy: Any, latents: Tensor, timesteps: Tensor, prompt_embeds: Tensor, guidance_scale: float | None = None
) -> Tensor:
    """One transformer call (no CFG): the velocity ``(B, C, H, W)`` at x_σ ``(B, C, H, W)``, timesteps ``(B,)``.

    ``guidance_scale``: the embedded guidance (default: the policy's); ignored by models without it (schnell).
    """
    transformer = policy.unet
    b, _, height, width = latents.shape
    hidden, pooled = unpack_pooled(prompt_embeds, int(transformer.config.pooled_projection_dim))
    t = model_time(policy, timesteps).to(latents.device, torch.float32)
    guidance = None
    if transformer.config.guidance_embeds:
        w = policy.guidance_scale if guidance_scale is None else float(guidance_scale)
        guidance = torch.full((b,), w, device=latents.device, dtype=torch.float32)
    out = transformer(
        hidden_states=pack_latents(latents),
        timestep=t / 1000,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=hidden,
        txt_ids=torch.zeros(hidden.shape[1], 3, device=latents.device, dtype=hidden.dtype),
        img_ids=latent_image_ids(height, width, latents.device, hidden.dtype),
        return_dict=False,
    )[0]
    return unpack_latents(out, height, width)
