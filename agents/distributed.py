"""Multi-GPU / multi-node training on HF accelerate: DDP for LoRA and one-GPU-size models, FSDP for larger ones.

Configure with ``accelerate config``, start with ``accelerate launch -m diffusion_mdp train ...`` (one process per
GPU, each with its own vector environment); ``docs/distributed.md`` has the commands. Per epoch, W processes:

1. **Sampling is split by sample batch**: process r samples batches r, r + W, r + 2W, ... of the epoch, each
   seeded by its *global* index, so the epoch's trajectories are exactly those of a one-process run.
2. **The rollout buffer is gathered** (:func:`sync_rollout_buffer`, ``Accelerator.gather`` and
   ``gather_object``): every process then holds the whole epoch — latents, log-probs, rewards, prompts — as
   a one-process run would. Rewards and prompts are global, so the per-prompt (or group) advantage
   statistics are computed over the global batch, identically on every process.
3. **Training splits every minibatch**: the shuffle is drawn from the same seeded generator on every
   process; process r trains on the r-th contiguous chunk of each global minibatch. The model is
   ``Accelerator.prepare``-d: DDP (or FSDP) averages the gradients over processes in the backward pass of the
   last step before each optimizer step; the backward passes before it run under ``Accelerator.no_sync``
   (:meth:`Distributed.gradient_sync`). Equal chunks make the average of per-process means the global mean,
   so one update equals a one-process update on the same global batch up to float summation order
   (``tests/test_real_scale_distributed.py`` checks it on CPU with gloo).
4. **Logging, images, evaluation and checkpoints** happen on the main process (``is_main_process``);
   training metrics (losses, KL, clip fractions) are averaged over processes first (``Accelerator.reduce``);
   a stop request (Ctrl-C, SIGTERM) on any process stops all of them after the same epoch
   (``set_trigger`` / ``check_trigger``).

Strategies (``TrainConfig.distributed_strategy``): ``ddp`` replicates the model and all-reduces the gradients
of its trainable parameters (a LoRA adapter: a few MB); ``fsdp`` shards parameters, gradients and AdamW
states over the processes (FSDP2, ``fully_shard`` on each block class the model lists in
``_no_split_modules``), for full fine-tuning of models that do not fit one GPU; ``auto`` takes FSDP when
``accelerate launch`` was configured for it (``--use_fsdp`` or the ``accelerate config`` file), else DDP. Under
FSDP every forward pass is collective, so evaluation and checkpoint gathering run on every process (the main
process writes).

With one process (no launcher) no ``Accelerator`` is created and every method here is a no-op or the
identity: single-process training is bit-identical to training without this module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError

# Tensors of DenoisingRolloutBuffer filled per sample batch (rows of trajectories); zeros elsewhere.
BUFFER_TENSORS = ("latents", "timesteps", "log_probs", "rewards", "prompt_embeds", "prompt_ids")
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


class PreparedModel(torch.nn.Module):
    """A model wrapped by ``Accelerator.prepare`` (DDP) that still looks like the model to its callers.

    :class:`~diffusion_mdp.policy.DiffusionPolicy` and the model families read ``unet.config`` and call the
    adapters' methods; DDP's wrapper has neither, so attribute access falls through to the inner model.
    Calls under ``torch.no_grad()`` (sampling, the KL reference, evaluation on the main process only) go to
    the inner model directly: they need no gradient synchronisation, and DDP must not enter its collective
    bookkeeping on one process alone.

    Args:
        prepared: The DDP-wrapped model.
        inner: The model itself (``prepared.module``).
    """

    def __init__(self, prepared: torch.nn.Module, inner: torch.nn.Module) -> None:
        super().__init__()
        self.prepared = prepared
        self.__dict__["_inner"] = inner  # not a second registration of the same parameters

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return self.prepared(*args, **kwargs)
        return self.__dict__["_inner"](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_inner")
            if inner is None:
                raise
            return getattr(inner, name)


class Distributed:
    """Rank, world size and collectives of a run, on an ``accelerate.Accelerator`` (None: one process, inert).

    Args:
        accelerator: The run's ``Accelerator``; None with one process.
        strategy: ``"single"``, ``"ddp"`` or ``"fsdp"``.
    """

    def __init__(self, accelerator: Any = None, strategy: str = "single") -> None:
        self.accelerator = accelerator
        self.strategy = strategy
        self._prepared: torch.nn.Module | None = None

    @classmethod
    def from_config(cls, config: Any, environ: Mapping[str, str] | None = None) -> Distributed:
        """The run's process group: an ``Accelerator`` when launched with several processes, else inert.

        Raises:
            ConfigError: The config and the launcher's settings do not fit (:func:`launch_problems`).
        """
        launch = LaunchSettings.from_environment(environ)
        problems = launch_problems(config, launch)
        if problems:
            raise ConfigError("invalid config for this launch: " + "\n  ".join(problems))
        strategy = resolve_strategy(config, launch)
        if strategy == "single":
            return cls()
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        kwargs: dict[str, Any] = {
            "cpu": torch.device(config.device).type == "cpu",
            "mixed_precision": "no",  # the agent's own autocast covers sampling and training alike
            "device_placement": False,  # the agent puts its modules on self.device itself
        }
        if strategy == "fsdp":
            from accelerate import FullyShardedDataParallelPlugin

            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**fsdp_plugin_kwargs(environ))
        else:
            # No buffer broadcast in forward: the models' buffers are constants (SD3's position table alone is
            # 0.9 GB in float32), and rank 0's are broadcast once at construction anyway. (torch 2.13 calls the
            # flag deprecated in favour of forward_sync_buffers, which accelerate's kwargs handler cannot pass yet.)
            kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(broadcast_buffers=False)]
        accelerator = Accelerator(**kwargs)
        if strategy == "fsdp" and not getattr(accelerator, "is_fsdp2", False):
            raise ConfigError(
                f"accelerate did not set up FSDP2 ({accelerator.state.distributed_type}): FSDP runs on CUDA GPUs "
                "only; launch on GPUs, or use distributed_strategy='ddp'"
            )
        return cls(accelerator, strategy)

    # -- who am I ---------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else int(self.accelerator.process_index)

    @property
    def world_size(self) -> int:
        return 1 if self.accelerator is None else int(self.accelerator.num_processes)

    @property
    def local_rank(self) -> int:
        return 0 if self.accelerator is None else int(self.accelerator.local_process_index)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or bool(self.accelerator.is_main_process)

    @property
    def sharded(self) -> bool:
        """FSDP: every forward pass and every state-dict gathering is collective (all processes take part)."""
        return self.strategy == "fsdp"

    def device(self, device: str) -> torch.device:
        """This process's device: ``cuda`` becomes ``cuda:<local_rank>`` when distributed."""
        dev = torch.device(device)
        if self.enabled and dev.type == "cuda" and dev.index is None:
            return torch.device("cuda", self.local_rank)
        return dev

    def local_batches(self, num_batches: int) -> range:
        """The global sample-batch indices this process samples: ``rank, rank + W, ...``."""
        return range(self.rank, num_batches, self.world_size)

    def shard(self, indices: Tensor) -> Tensor:
        """This process's contiguous chunk of a global minibatch's trajectory indices."""
        if not self.enabled:
            return indices
        size = len(indices) // self.world_size
        return indices[self.rank * size : (self.rank + 1) * size]

    # -- the model and its gradients --------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer: Any) -> tuple[torch.nn.Module, Any]:
        """``Accelerator.prepare(model, optimizer)``; returns the model to call and the optimizer to step.

        DDP: the model to call is a :class:`PreparedModel` around the DDP wrapper (DDP also broadcasts rank 0's
        weights, so every replica starts identical). FSDP2 shards ``model`` in place and swaps the optimizer's
        parameters for the shards: re-read ``model.parameters()`` afterwards.
        """
        if self.accelerator is None:
            return model, optimizer
        prepared, optimizer = self.accelerator.prepare(model, optimizer)
        self._prepared = prepared
        if prepared is model:
            return model, optimizer
        return PreparedModel(prepared, model), optimizer

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Around a forward + backward: ``sync=False`` accumulates locally (``Accelerator.no_sync``)."""
        if sync or self.accelerator is None or self._prepared is None:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self._prepared)

    def backward(self, loss: Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm_(self, params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the gradients' global norm (over all shards under FSDP); returns the norm before clipping."""
        params = list(params)
        if self.accelerator is None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = self.accelerator.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
        return float(full() if full is not None else norm)

    # -- collectives ------------------------------------------------------------------------------
    def gather(self, tensor: Tensor) -> Tensor:
        """Every process's ``tensor`` concatenated along dim 0, in rank order."""
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_objects(self, objects: list[Any]) -> list[Any]:
        """Every process's list, concatenated in rank order."""
        if self.accelerator is None:
            return list(objects)
        from accelerate.utils import gather_object

        return list(gather_object(list(objects)))

    def average_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The mean of each float metric over processes (losses of equal shards average to the global loss)."""
        if not self.enabled or not metrics:
            return metrics
        keys = list(metrics)  # the same keys in the same order on every process: the same code ran
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return {key: float(value) for key, value in zip(keys, values.tolist(), strict=True)}

    def any_process(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any (``set_trigger`` / ``check_trigger``)."""
        if not self.enabled:
            return flag
        if flag:
            self.accelerator.set_trigger()
        return bool(self.accelerator.check_trigger())

    def barrier(self) -> None:
        if self.enabled:
            self.accelerator.wait_for_everyone()

    # -- FSDP: full state dicts from shards (collective; every process calls) ---------------------
    def trainable_state(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """``{name: tensor}`` of the trainable parameters, whole (gathered to the main process under FSDP)."""
        if not self.sharded:
            return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state: dict[str, Any] = dict(get_model_state_dict(model, options=options))
        return state

    def optimizer_state(self, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
        """The optimizer's state dict (under FSDP: keyed by parameter name, gathered to the main process)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return dict(get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options))

    def load_trainable(
        self, model: torch.nn.Module, optimizer: Any, trainable: Mapping[str, Tensor], optimizer_state: Any
    ) -> None:
        """Under FSDP: scatter full state dicts (read by every process from the checkpoint) into the shards."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, dict(trainable), options=options)
        inner = getattr(optimizer, "optimizer", optimizer)
        set_optimizer_state_dict(model, inner, optimizer_state, options=StateDictOptions(full_state_dict=True))

    def save_full_model(self, model: Any, folder: Path) -> None:
        """Under FSDP: gather the whole model and write it in diffusers format (main process)."""
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state: dict[str, Any] = dict(get_model_state_dict(model, options=options))
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            model.save_config(folder)
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / SAFETENSORS_WEIGHTS_NAME))
        self.barrier()


def sync_rollout_buffer(dist: Distributed, buffer: Any, owned_rows: Sequence[int]) -> None:
    """Give every process the whole epoch: the rows each process filled, gathered into every buffer.

    Each process filled only its own trajectories (rows ``owned_rows``; the same number on every process);
    their tensors, row indices, prompts and group ids are gathered in rank order and written into place.
    Afterwards the buffer is full and identical on every process.

    Args:
        dist: The process group.
        buffer: A ``DenoisingRolloutBuffer`` filled on ``owned_rows``.
        owned_rows: Trajectory rows this process filled.
    """
    rows = np.asarray(list(owned_rows), dtype=np.int64)
    if dist.enabled:
        index = torch.as_tensor(rows, device=buffer.device)
        all_rows = dist.gather(index)
        for name in BUFFER_TENSORS:
            tensor = getattr(buffer, name)
            tensor[all_rows] = dist.gather(tensor[index].contiguous())
        group_ids = torch.as_tensor(buffer.group_ids[rows], device=buffer.device)
        buffer.group_ids[all_rows.cpu().numpy()] = dist.gather(group_ids).cpu().numpy()
        prompts = dist.gather_objects([buffer.prompts[i] for i in rows])
        for row, prompt in zip(all_rows.tolist(), prompts, strict=True):
            buffer.prompts[int(row)] = prompt
    buffer.full = True


__all__ = [
    "STRATEGIES",
    "Distributed",
    "LaunchSettings",
    "PreparedModel",
    "fsdp_plugin_kwargs",
    "fsdp_wrap_plan",
    "launch_problems",
    "resolve_strategy",
    "sync_rollout_buffer",
]
