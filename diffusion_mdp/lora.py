"""LoRA on the denoiser: add a trainable adapter to its attention projections, export it in diffusers format.

Core code (no agent): the training agents and the SB3 adapter (``diffusion_mdp.envs.sb3``) both use it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffusion_mdp.families import is_flow

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as the paper's LoRA


def add_lora(unet: torch.nn.Module, rank: int, alpha: float) -> None:
    """Freeze the UNet and add a trainable LoRA adapter to its attention projections (diffusers + peft)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(  # type: ignore[operator]
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES)
    )
    # Trainable parameters stay in float32 even when the forward runs under bf16/fp16 autocast.
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def export_lora(unet: torch.nn.Module, folder: str | os.PathLike[str], family: str = "sd") -> Path:
    """Save the UNet's LoRA adapter in diffusers format (``StableDiffusionPipeline.load_lora_weights``).

    SD3 / FLUX (``family``): the transformer's adapter, for ``StableDiffusion3Pipeline`` / ``FluxPipeline``'s
    ``load_lora_weights``.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    if is_flow(family):
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        pipeline_class = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
        layers = get_peft_model_state_dict(unet)
        pipeline_class.save_lora_weights(folder, transformer_lora_layers=layers, safe_serialization=True)
        return folder
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder
