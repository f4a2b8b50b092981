"""LoRA on the denoiser: add a trainable adapter to its attention projections, merge it for sampling, export it
in diffusers format.

Core code (no agent): the training agents and the SB3 adapter (``diffusion_mdp.envs.sb3``) both use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from diffusion_mdp.families import is_flow

if TYPE_CHECKING:
    from peft.tuners.tuners_utils import BaseTunerLayer

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as the paper's LoRA


def add_lora(unet: torch.nn.Module, rank: int, alpha: float) -> None:
    """Freeze the UNet and add a trainable LoRA adapter to its attention projections (diffusers + peft)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    # peft annotates lora_alpha as int, but it is only the scale alpha / r: a float alpha works (and is the config's).
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES  # type: ignore[arg-type]
    )
    unet.add_adapter(config)  # type: ignore[operator]
    # Trainable parameters stay in float32 even when the forward runs under bf16/fp16 autocast.
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()


@contextlib.contextmanager
def merged_lora(unet: torch.nn.Module) -> Iterator[None]:
    """The UNet's LoRA adapters merged into their base weights (faster sampling); the exact base weights after.

    Unmerging ((W + BA) - BA) would drift by rounding every epoch, so the base weights are saved and copied back.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    saved = [_base_weight(layer).detach().clone() for layer in layers]
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        for layer, weight in zip(layers, saved, strict=True):
            _base_weight(layer).data.copy_(weight)
            layer.merged_adapters.clear()


def _base_weight(layer: BaseTunerLayer) -> torch.Tensor:
    """The weight of a peft tuner layer's base layer (a Parameter; nn.Module's attributes are typed Tensor | Module)."""
    return cast(torch.Tensor, layer.get_base_layer().weight)


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
