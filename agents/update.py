"""The one update loop every agent shares: passes over the epoch's samples, accumulation, clipping, AdamW.

An algorithm is a loss on one step batch; this loop does the rest, once for all of them (CleanRL's
``ppo_continuous_action.py`` writes the same loop inline; here DDPO-IS, DDPO-SF, RWR and the GRPO example
share it). Per epoch e, with B = ``train_batch_size``, K = ``ceil(timestep_fraction · T)`` and
G = :meth:`~Learner.accumulation_steps` and c = ``timesteps_per_forward``::

    A  = prepare_update(e)                         # the algorithm fills what its loss reads (advantages, …)
    for inner in 1 .. num_inner_epochs:
        for each minibatch of B trajectories       # shuffled across samples and, per trajectory, across time
            for j in 1 .. K, c at a time:          # the j-th of each trajectory's own K steps
                loss = step_loss(steps j .. j+c-1) · c / (K · G)   # one forward of b·c rows
                backward(loss)                     # accumulate: c steps' activations in memory at a time
            every G minibatches (and after the last): unscale, clip ‖g‖, AdamW step, zero

so one optimizer step follows the mean loss over K timesteps × G minibatches (the paper: 256 samples,
4 minibatches, 4 updates per epoch with G = 1; DDPO-SF sets G = the number of minibatches, one step per
epoch). Every statistic a loss reports is averaged over the steps that report it; ``grad_norm`` is the mean
pre-clip norm over the optimizer steps.

With several processes (``agents/distributed.py``) each step's forward and backward run inside
:meth:`~Learner.gradient_sync`: only the last backward before an optimizer step averages the gradients over
processes (DDP / FSDP); the ones before accumulate locally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from .buffer import DenoisingRolloutBuffer, StepBatch, TrajectoryMinibatch
from .config import TrainConfig

Stats = Mapping[str, Tensor | float]


class Learner(Protocol):
    """What the update loop reads of an agent (``DiffusionAgent`` provides all of it)."""

    config: TrainConfig
    buffer: DenoisingRolloutBuffer
    first_step_metrics: ClassVar[tuple[str, ...]]

    def prepare_update(self, epoch: int) -> dict[str, float]: ...

    def step_loss(self, step: StepBatch, epoch: int) -> tuple[Tensor, Stats]: ...

    def accumulation_steps(self, num_minibatches: int) -> int: ...

    def trained_steps(self, epoch: int) -> tuple[int, int] | None: ...

    def shuffle_generator(self, epoch: int, inner_epoch: int) -> torch.Generator: ...

    def backward(self, loss: Tensor) -> None: ...

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]: ...

    def optimizer_step(self) -> float: ...


def run_update(agent: Learner, epoch: int, step_optimizer: bool = True) -> dict[str, float]:
    """Train ``agent`` on its filled buffer for one epoch (see the module docstring); return the metrics.

    Args:
        agent: The agent (its buffer holds the epoch's ``samples_per_epoch`` trajectories).
        epoch: The epoch index e (0-based): seeds the shuffles and drives the schedules.
        step_optimizer: False only accumulates the gradient in the parameters' ``.grad`` (no AdamW step, no
            clipping): the raw policy gradient, for diagnostics.

    Returns:
        ``{"loss", <each statistic the loss reports>, "grad_norm", <prepare_update's metrics>,
        "first_<name>" for each name in ``agent.first_step_metrics``}``, all floats.
    """
    cfg = agent.config
    per_forward = cfg.timesteps_per_forward
    extra = agent.prepare_update(epoch)
    logs: dict[str, list[float]] = {"loss": []}
    first: dict[str, float] = {}
    grad_norms: list[float] = []
    for inner in range(cfg.num_inner_epochs):
        generator = agent.shuffle_generator(epoch, inner)
        minibatches: list[TrajectoryMinibatch] = list(
            agent.buffer.get(cfg.train_batch_size, cfg.timestep_fraction, generator, agent.trained_steps(epoch))
        )
        accumulation = agent.accumulation_steps(len(minibatches))
        for mb_index, minibatch in enumerate(minibatches):
            # 1/(K·G): the accumulated gradient is that of the mean loss over K timesteps × G minibatches.
            scale = 1.0 / (minibatch.num_timesteps * accumulation)
            step_due = (mb_index + 1) % accumulation == 0 or mb_index == len(minibatches) - 1
            num_timesteps = minibatch.num_timesteps
            for start in range(0, num_timesteps, per_forward):
                stop = min(start + per_forward, num_timesteps)
                # A step loss is a mean over its rows, so c stacked steps' loss is the mean of their c losses:
                # scaled by c/(K·G), the accumulated gradient is the same as c separate steps'.
                with agent.gradient_sync(step_due and stop == num_timesteps):
                    loss, stats = agent.step_loss(minibatch.steps(start, stop), epoch)
                    agent.backward(loss * (scale * (stop - start)))
                # Weighted by the number of steps stacked, so every mean below is over steps whatever c is.
                logs["loss"].extend([float(loss.detach())] * (stop - start))
                for name, value in stats.items():
                    number = float(value.detach() if isinstance(value, Tensor) else value)
                    if name in agent.first_step_metrics:
                        first.setdefault(f"first_{name}", number)
                    else:
                        logs.setdefault(name, []).extend([number] * (stop - start))
            if step_optimizer and step_due:
                grad_norms.append(agent.optimizer_step())
    metrics = {name: float(np.mean(values)) for name, values in logs.items() if values}
    if grad_norms:
        metrics["grad_norm"] = float(np.mean(grad_norms))
    return {**metrics, **extra, **first}


__all__ = ["Learner", "Stats", "run_update"]
