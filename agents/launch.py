"""What ``accelerate launch`` asked for, and whether a run's config fits it: checked before any model loads.

:class:`LaunchSettings` reads the launcher's environment (``accelerate launch`` exports its choices as
``ACCELERATE_*`` / ``WORLD_SIZE`` variables), :func:`resolve_strategy` turns ``distributed_strategy="auto"``
into DDP or FSDP, :func:`launch_problems` lists every config / launch mismatch with its fix, and
:func:`fsdp_plugin_kwargs` / :func:`fsdp_wrap_plan` say how FSDP would shard a model. The engine that runs
the processes is :mod:`.distributed`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

STRATEGIES = ("auto", "ddp", "fsdp")


def _flag(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class LaunchSettings:
    """What the launcher (``accelerate launch``, ``torchrun``) put in the environment.

    Attributes:
        world_size: ``WORLD_SIZE`` (1 without a launcher).
        fsdp: ``accelerate launch --use_fsdp`` (or an ``accelerate config`` with ``distributed_type: FSDP``).
        fsdp_version: ``FSDP_VERSION`` (None: not set).
        mixed_precision: ``ACCELERATE_MIXED_PRECISION`` (``"no"`` when unset).
        use_cpu: ``accelerate launch --cpu``.
        deepspeed, megatron: launched for DeepSpeed / Megatron-LM (not supported here).
        gradient_accumulation_steps: ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` (1 when unset).
    """

    world_size: int = 1
    fsdp: bool = False
    fsdp_version: int | None = None
    mixed_precision: str = "no"
    use_cpu: bool = False
    deepspeed: bool = False
    megatron: bool = False
    gradient_accumulation_steps: int = 1

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> LaunchSettings:
        env = os.environ if environ is None else environ
        version = env.get("FSDP_VERSION")
        return cls(
            world_size=int(env.get("WORLD_SIZE", "1") or 1),
            fsdp=_flag(env.get("ACCELERATE_USE_FSDP")),
            fsdp_version=int(version) if version else None,
            mixed_precision=(env.get("ACCELERATE_MIXED_PRECISION") or "no").lower(),
            use_cpu=_flag(env.get("ACCELERATE_USE_CPU")),
            deepspeed=_flag(env.get("ACCELERATE_USE_DEEPSPEED")),
            megatron=_flag(env.get("ACCELERATE_USE_MEGATRON_LM")),
            gradient_accumulation_steps=int(env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1") or 1),
        )


def resolve_strategy(config: Any, launch: LaunchSettings) -> str:
    """``"single"`` (one process, no accelerate), ``"ddp"`` or ``"fsdp"`` for ``config`` under ``launch``."""
    if config.distributed_strategy == "fsdp" or (config.distributed_strategy == "auto" and launch.fsdp):
        return "fsdp"
    return "ddp" if launch.world_size > 1 else "single"


def launch_problems(config: Any, launch: LaunchSettings) -> list[str]:
    """Why ``config`` cannot run under the launcher's settings (empty: it can). Checked before any model loads.

    The config's own rules (strategy names, FSDP needs full fine-tuning on CUDA) are in
    :meth:`TrainConfig.validate`; these are the ones that depend on how the processes were started.
    """
    problems = []
    strategy = resolve_strategy(config, launch)
    if launch.deepspeed or launch.megatron:
        engine = "DeepSpeed" if launch.deepspeed else "Megatron-LM"
        problems.append(
            f"accelerate launch was configured for {engine}, which this trainer does not drive: choose "
            "multi-GPU (DDP) or FSDP in `accelerate config` (or launch with --multi_gpu / --use_fsdp)"
        )
    if launch.fsdp and config.distributed_strategy == "ddp":
        problems.append(
            "accelerate launch was configured for FSDP but the run asks for distributed_strategy='ddp': set "
            "distributed_strategy='fsdp' (or 'auto'), or launch with --multi_gpu instead of --use_fsdp"
        )
    if strategy == "fsdp":
        if launch.world_size < 2:
            problems.append(
                "FSDP shards the model over processes, but this is a single process: start it with"
                " `accelerate launch --num_processes N -m diffusion_mdp train ...` (N >= 2 GPUs)"
            )
        if launch.fsdp_version not in (None, 2):
            problems.append(
                f"accelerate launch asks for FSDP version {launch.fsdp_version}; this trainer runs FSDP2 "
                "(fully_shard): set `fsdp_version: 2` in the accelerate config or pass --fsdp_version 2"
            )
        if config.use_lora:
            problems.append(
                "FSDP was requested for a LoRA run: LoRA trains with DDP (the frozen base is replicated and only the "
                "adapter's gradients are all-reduced); set use_lora=false for sharded full fine-tuning, or use "
                "distributed_strategy='ddp' and launch with --multi_gpu"
            )
    if launch.world_size > 1 and launch.use_cpu and str(config.device).startswith("cuda"):
        problems.append(
            f"accelerate launch --cpu was used but device={config.device!r}: drop --cpu, or set device='cpu'"
        )
    if launch.mixed_precision not in ("no", config.mixed_precision) and config.mixed_precision != "auto":
        problems.append(
            f"accelerate launch asks for mixed_precision={launch.mixed_precision!r} but the run's config says "
            f"{config.mixed_precision!r}: the trainer applies mixed precision itself, to sampling and training "
            f"alike, from its config; pass --mixed-precision {launch.mixed_precision} to diffusion-mdp train (or "
            "launch with --mixed_precision no)"
        )
    if launch.gradient_accumulation_steps != 1:
        problems.append(
            f"accelerate launch asks for gradient_accumulation_steps={launch.gradient_accumulation_steps}: the "
            "trainer accumulates from its own config; pass --gradient-accumulation-steps to diffusion-mdp train"
        )
    return problems


def fsdp_plugin_kwargs(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keywords of ``accelerate.FullyShardedDataParallelPlugin`` for this trainer.

    What the ``accelerate config`` file or ``accelerate launch`` flags set (``FSDP_*`` variables) is kept;
    otherwise FSDP2 with transformer-based wrapping, whose block classes accelerate takes from the model's
    ``_no_split_modules`` (diffusers lists them: ``BasicTransformerBlock``/``ResnetBlock2D``/... for the
    UNet, ``JointTransformerBlock`` for SD3, ``FluxTransformerBlock``/``FluxSingleTransformerBlock`` for
    FLUX). Without a wrap policy the whole model would be one FSDP unit, all-gathered at once: no saving.
    """
    env = os.environ if environ is None else environ
    kwargs: dict[str, Any] = {}
    if "FSDP_VERSION" not in env:
        kwargs["fsdp_version"] = 2
    if "FSDP_AUTO_WRAP_POLICY" not in env:
        kwargs["auto_wrap_policy"] = "transformer_based_wrap"
    return kwargs


def fsdp_wrap_plan(model: torch.nn.Module, plugin: Any) -> list[str]:
    """Names of the submodules FSDP2 shards as their own unit under ``plugin`` (accelerate's own policy code).

    ``accelerate`` applies ``fully_shard`` to every module its policy accepts, then to the root; this is that
    policy evaluated on ``model``, so a plan can be checked (and logged) without GPUs.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    if policy is None:
        return []
    return [name for name, module in model.named_modules() if name and policy(module)]
