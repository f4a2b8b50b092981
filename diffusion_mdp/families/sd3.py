"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel``, two CLIP encoders and an optional T5, flow matching.

What the policy does here is what ``StableDiffusion3Pipeline`` does (the tests compare with it):

- **Prompts** (``encode_prompt``): the penultimate hidden states of CLIP-L and CLIP-G are concatenated along
  the width and zero-padded to the transformer's ``joint_attention_dim``; T5's last hidden states (or zeros
  when the pipeline was saved without ``text_encoder_3``, as diffusers allows) follow along the sequence; the
  pooled embedding is the two CLIPs' projected pooled outputs concatenated. Packed: ``(B, 77 + 256 + 1, 4096)``
  for SD3-medium.
- **Guidance**: classifier-free, the unconditional branch is the empty prompt encoded the same way.
- **Network**: ``transformer(latents, timestep=t, encoder_hidden_states, pooled_projections)`` with t = 1000 σ.
- **Schedule**: ``FlowMatchEulerDiscreteScheduler`` with its static shift (3.0), or dynamic shifting with μ from
  the image's token count when its config asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusion_mdp.families import model_time, pack_pooled, unpack_pooled
from diffusion_mdp.flow import FlowMatchSchedule

SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
T5_MAX_LENGTH = 256  # the pipeline's default max_sequence_length


def load(load: Callable[..., Any], index: dict[str, Any], torch_dtype: torch.dtype) -> dict[str, Any]:
    """The pipeline's modules as :class:`~diffusion_mdp.models.DiffusionComponents` fields (T5 may be None)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    fields = {
        "unet": load(SD3Transformer2DModel, "transformer", torch_dtype=torch_dtype),
        "vae": load(AutoencoderKL, "vae", torch_dtype=torch_dtype),
        "text_encoder": load(CLIPTextModelWithProjection, "text_encoder", dtype=torch_dtype),
        "text_encoder_2": load(CLIPTextModelWithProjection, "text_encoder_2", dtype=torch_dtype),
        "tokenizer": load(CLIPTokenizer, "tokenizer"),
        "tokenizer_2": load(CLIPTokenizer, "tokenizer_2"),
        "scheduler": load(FlowMatchEulerDiscreteScheduler, "scheduler"),
        "text_encoder_3": None,
        "tokenizer_3": None,
    }
    if _present(index, "text_encoder_3"):
        fields["text_encoder_3"] = load(T5EncoderModel, "text_encoder_3", dtype=torch_dtype)
        fields["tokenizer_3"] = load(AutoTokenizer, "tokenizer_3")
    return fields


def _present(index: dict[str, Any], name: str) -> bool:
    """Whether ``model_index.json`` lists a component (a pipeline saved without one writes ``[null, null]``)."""
    entry = index.get(name)
    return isinstance(entry, list | tuple) and any(part is not None for part in entry)


def latent_shape(components: Any) -> tuple[int, int, int]:
    """(C, H, W) of a latent: the transformer's ``in_channels`` and ``sample_size`` (the pipeline's default)."""
    config = components.unet.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config.in_channels), int(height), int(width))


def make_schedule(components: Any, num_steps: int, noise_level: float) -> FlowMatchSchedule:
    """The SDE schedule the pipeline would use at the default resolution."""
    scheduler, mu = components.scheduler, None
    if scheduler.config.get("use_dynamic_shifting"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        _, height, width = latent_shape(components)
        patch = components.unet.config.patch_size
        config = scheduler.config
        mu = calculate_shift(
            (height // patch) * (width // patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),  # the SD3 pipeline's fallback
        )
    return FlowMatchSchedule.from_scheduler(scheduler, num_steps, noise_level, mu=mu)


def _tokens(tokenizer: Any, prompts: list[str], max_length: int, device: torch.device) -> Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def encode(policy: Any, prompts: list[str]) -> Tensor:
    """``StableDiffusion3Pipeline.encode_prompt`` (no clip skip), packed: ``(B, L_clip + L_t5 + 1, D_joint)``."""
    components = policy.components
    hidden, pooled = [], []
    for tokenizer, encoder in (
        (components.tokenizer, components.text_encoder),
        (components.tokenizer_2, components.text_encoder_2),
    ):
        tokens = _tokens(tokenizer, prompts, tokenizer.model_max_length, encoder.device)
        out = encoder(tokens, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])  # text_embeds: the projected pooled output
    clip = torch.cat(hidden, dim=-1)
    joint_dim = int(components.unet.config.joint_attention_dim)
    if components.text_encoder_3 is None:
        t5 = clip.new_zeros((len(prompts), T5_MAX_LENGTH, joint_dim))
    else:
        encoder = components.text_encoder_3
        t5 = encoder(_tokens(components.tokenizer_3, prompts, T5_MAX_LENGTH, encoder.device))[0].to(clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    return pack_pooled(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))


def forward(policy: Any, latents: Tensor, timesteps: Tensor, prompt_embeds: Tensor) -> Tensor:
    """One transformer call: the velocity ``(B, C, H, W)`` at x_σ ``(B, C, H, W)``, timesteps ``(B,)``."""
    transformer = policy.unet
    hidden, pooled = unpack_pooled(prompt_embeds, int(transformer.config.pooled_projection_dim))
    t = model_time(policy, timesteps).to(latents.device, torch.float32)
    return transformer(
        hidden_states=latents, timestep=t, encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False
    )[0]
