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
identity: single-process training is bit-identical to training without this module. What the launcher
asked for and whether the config fits it (checked before any model loads) is :mod:`.launch`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError
from .launch import (
    STRATEGIES,
    LaunchSettings,
    fsdp_plugin_kwargs,
    fsdp_wrap_plan,
    launch_problems,
    resolve_strategy,
)

# Tensors of DenoisingRolloutBuffer filled per sample batch (rows of trajectories); zeros elsewhere.
BUFFER_TENSORS = ("latents", "timesteps", "log_probs", "rewards", "prompt_embeds", "prompt_ids")


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
