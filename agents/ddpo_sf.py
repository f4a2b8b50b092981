"""DDPO-SF: the score-function (REINFORCE) policy gradient (DDPO, section 4.2, eq. 3).

    ∇_θ J = E[ Σ_t ∇_θ log π_θ(x_{t-1} | x_t, c) · A ]      minimise  L = -mean_t(A · log π_θ)

Strictly on-policy: the samples of an epoch give exactly one gradient step (the gradient is accumulated
over all minibatches and timesteps: G = the number of minibatches in the shared loop of ``update.py``), so
``num_inner_epochs`` must be 1. Shuffling and timestep_fraction work as in DDPO-IS; at θ = θ_old the
gradient equals DDPO-IS's unclipped one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor

from .base import DiffusionAgent
from .buffer import StepBatch
from .update import run_update


class DDPOSF(DiffusionAgent):
    """DDPO with the score-function estimator: one gradient step per batch of fresh samples."""

    algorithm: ClassVar[str] = "ddpo_sf"

    def step_loss(self, step: StepBatch, epoch: int) -> tuple[Tensor, Mapping[str, Tensor]]:
        """-mean_b(A log π_θ(x_{t-1} | x_t, c)) (+ β KL(π_θ ‖ π_ref) with ``kl_coef`` = β > 0)."""
        log_prob, out = self.step_log_prob(step)
        loss = -(step.advantages * log_prob).mean()
        if self.config.kl_coef > 0:
            kl = self.kl_to_reference(step, out).mean()
            return loss + self.config.kl_coef * kl, {"kl_ref": kl}
        return loss, {}

    def accumulation_steps(self, num_minibatches: int) -> int:
        return num_minibatches  # every minibatch of the epoch into one step: 1/(K · number of minibatches)

    def accumulate_gradient(self, epoch: int) -> tuple[float, float | None]:
        """Add ∇ of the epoch's REINFORCE loss to the trainable parameters' ``.grad``; no optimizer step.

        Returns:
            ``(mean loss, mean KL to the reference or None)`` over the epoch's steps.
        """
        metrics = run_update(self, epoch, step_optimizer=False)
        return metrics["loss"], metrics.get("kl_ref")


__all__ = ["DDPOSF"]
