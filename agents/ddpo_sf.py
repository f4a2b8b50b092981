"""DDPO-SF: the score-function (REINFORCE) policy gradient (DDPO, section 4.2, eq. 3).

    ∇_θ J = E[ Σ_t ∇_θ log π_θ(x_{t-1} | x_t, c) · A ]      minimise  L = -mean_t(A · log π_θ)

Strictly on-policy: the samples of an epoch give exactly one gradient step (the gradient is accumulated
over all minibatches and timesteps), so ``num_inner_epochs`` must be 1. Shuffling and timestep_fraction
work as in DDPO-IS; at θ = θ_old the gradient equals DDPO-IS's unclipped one.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .base import DiffusionAgent


class DDPOSF(DiffusionAgent):
    """DDPO with the score-function estimator: one gradient step per batch of fresh samples."""

    algorithm: ClassVar[str] = "ddpo_sf"

    def train_on_rollouts(self, epoch: int) -> dict[str, float]:
        loss, kl = self.accumulate_gradient(epoch)
        grad_norm = self.optimizer_step()
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if kl is not None:
            metrics["kl_ref"] = kl
        return metrics

    def accumulate_gradient(self, epoch: int) -> tuple[float, float | None]:
        """Add ∇ of the epoch's REINFORCE loss to the trainable parameters' ``.grad``; no optimizer step.

        Returns:
            ``(mean loss, mean KL to the reference or None)`` over the epoch's steps.
        """
        cfg, buffer = self.config, self.buffer
        buffer.compute_returns_and_advantage(self.normalizer, cfg.adv_clip_max)
        minibatches = list(buffer.get(cfg.train_batch_size, cfg.timestep_fraction, self.shuffle_generator(epoch, 0)))
        losses, kls = [], []
        for minibatch in minibatches:
            # Mean over all (trajectory, timestep) pairs of the epoch: 1/(K · number of minibatches) per step.
            scale = 1.0 / (minibatch.num_timesteps * len(minibatches))
            for j in range(minibatch.num_timesteps):
                step = minibatch.step(j)
                log_prob, out = self.step_log_prob(step)
                loss = -(step.advantages * log_prob).mean()
                if cfg.kl_coef > 0:
                    kl = self.kl_to_reference(step, out).mean()
                    loss = loss + cfg.kl_coef * kl
                    kls.append(float(kl.detach()))
                self.backward(loss * scale)
                losses.append(float(loss.detach()))
        return float(np.mean(losses)), (float(np.mean(kls)) if kls else None)


__all__ = ["DDPOSF"]
