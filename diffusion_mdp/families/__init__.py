"""Model families: what differs between SD 1.x/2.x, SDXL, SD3 and FLUX, one module per flow-matching family.

The MDP and the policy are the same for every family; a family decides

- how its pipeline folder is loaded (:func:`detect_family` reads ``model_index.json``),
- its schedule: DDIM (:mod:`diffusion_mdp.ddim`) for the UNet families, the flow-matching SDE
  (:mod:`diffusion_mdp.flow`) for SD3 and FLUX (:func:`make_schedule`, :func:`step_with_logprob`),
- how prompts become one tensor per prompt, and how the network is called.

SD and SDXL live in ``policy.py`` (they predate this package); SD3 and FLUX are :mod:`.sd3` and :mod:`.flux`,
each exposing ``SUBFOLDERS``, ``load``, ``latent_shape``, ``make_schedule``, ``encode`` and ``forward``. A new
family is one such module added to :data:`FLOW_FAMILIES`.

Prompt embeddings with a pooled vector are *packed* into one ``(B, L + 1, D)`` tensor (as SDXL's are): rows
``:L`` the token embeddings, row ``L`` the pooled embedding zero-padded to width D (:func:`pack_pooled`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from diffusion_mdp.ddim import DDIMSchedule, DDIMStepOutput, ddim_step_with_logprob
from diffusion_mdp.flow import FlowMatchSchedule, FlowStepOutput, flow_step_with_logprob

UNET_FAMILIES = ("sd", "sdxl")
FLOW_FAMILY_CLASSES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
# The folders every SD3 / FLUX pipeline has (SD3's text_encoder_3 is optional).
FLOW_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def family_module(family: str) -> ModuleType:
    """The module of a flow-matching family (``"sd3"`` or ``"flux"``)."""
    from . import flux, sd3

    modules = {"sd3": sd3, "flux": flux}
    if family not in modules:
        raise ValueError(f"unknown model family {family!r}: expected one of {', '.join((*UNET_FAMILIES, *modules))}")
    return modules[family]


def detect_family(index: dict[str, Any]) -> str:
    """The family of a pipeline from its ``model_index.json``: ``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"``.

    >>> detect_family({"_class_name": "StableDiffusion3Pipeline"}), detect_family({"_class_name": "FluxPipeline"})
    ('sd3', 'flux')
    >>> detect_family({"_class_name": "StableDiffusionPipeline"}), detect_family({"text_encoder_2": ["x", "y"]})
    ('sd', 'sdxl')
    """
    name = str(index.get("_class_name", ""))
    for prefix, family in FLOW_FAMILY_CLASSES.items():
        if name.startswith(prefix):
            return family
    if "transformer" in index:
        raise ValueError(
            f"model_index.json names {name!r} with a transformer/: supported transformer pipelines are "
            f"{', '.join(FLOW_FAMILY_CLASSES)}"
        )
    return "sdxl" if "XL" in name or "text_encoder_2" in index else "sd"


def is_flow(family: str) -> bool:
    """Whether the family is sampled by the flow-matching SDE (else by DDIM)."""
    return family not in UNET_FAMILIES


def make_schedule(components: Any, num_steps: int, eta: float) -> DDIMSchedule | FlowMatchSchedule:
    """The MDP's schedule for a model: DDIM with η = ``eta``, or the flow SDE with noise level a = ``eta``."""
    family = getattr(components, "family", "sd")
    if not is_flow(family):
        return DDIMSchedule.from_scheduler(components.scheduler, num_steps, eta)
    return family_module(family).make_schedule(components, num_steps, eta)


def step_with_logprob(
    schedule: DDIMSchedule | FlowMatchSchedule, *args: Any, **kwargs: Any
) -> DDIMStepOutput | FlowStepOutput:
    """The policy step of ``schedule``'s kind (same arguments as :func:`ddim_step_with_logprob`)."""
    if isinstance(schedule, FlowMatchSchedule):
        return flow_step_with_logprob(schedule, *args, **kwargs)
    return ddim_step_with_logprob(schedule, *args, **kwargs)


def pack_pooled(embeds: Tensor, pooled: Tensor) -> Tensor:
    """``(B, L, D)`` token embeddings and ``(B, P)`` pooled (P <= D) -> one ``(B, L + 1, D)`` tensor."""
    if pooled.shape[-1] > embeds.shape[-1]:
        raise ValueError(f"pooled width {pooled.shape[-1]} exceeds the embedding width {embeds.shape[-1]}")
    row = embeds.new_zeros((embeds.shape[0], 1, embeds.shape[-1]))
    row[:, 0, : pooled.shape[-1]] = pooled
    return torch.cat([embeds, row], dim=1)


def unpack_pooled(packed: Tensor, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_pooled`: ``(B, L + 1, D)`` -> ``((B, L, D), (B, pooled_dim))``."""
    return packed[:, :-1], packed[:, -1, :pooled_dim]


__all__ = [
    "detect_family",
    "family_module",
    "is_flow",
    "make_schedule",
    "model_time",
    "pack_pooled",
    "step_with_logprob",
    "unpack_pooled",
]


def model_time(policy: Any, timesteps: Tensor) -> Tensor:
    """The flow model's time input t = 1000 σ ``(B,)`` float64 for observation timesteps ``(B,)``.

    Integer timesteps (observations, the buffer) name a step of ``policy.schedule`` and map to its exact t;
    floating-point ones are taken as the exact t already.
    """
    if timesteps.is_floating_point():
        return timesteps.to(torch.float64)
    return policy.schedule.model_time(timesteps)
