"""DDPO-IS: PPO-style clipped importance sampling on every denoising step (DDPO, section 4.2, eq. 4).

For a trajectory sampled by π_old and a step (s_t, a_t) = ((c, t, x_t), x_{t-1}):

    ratio_t  = π_θ(x_{t-1} | x_t, c) / π_old(x_{t-1} | x_t, c) = exp(log π_θ - log π_old)
    L^CLIP   = E_t[ max(-A ratio_t, -A clip(ratio_t, 1 - ε, 1 + ε)) ]      (minimised)

with A the trajectory's normalised terminal reward (every step has the same one, see ``advantages.py``).
The log-probs are means over latent dimensions (DDPO's convention), which is why ε is tiny (1e-4).
Per epoch: ``num_inner_epochs`` passes over the samples, shuffled across samples and across time; the
gradient is accumulated over a minibatch's timesteps and over ``gradient_accumulation_steps`` minibatches
before each AdamW step (paper: 256 samples, 4 minibatches, 4 updates).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from .base import DiffusionAgent


def ppo_clip_loss(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate loss and its diagnostics.

    Args:
        log_probs: ``(b,)`` log π_θ(a | s) (with gradients).
        old_log_probs: ``(b,)`` log π_old(a | s) from sampling time.
        advantages: ``(b,)`` A.
        clip_range: ε.

    Returns:
        ``(loss, stats)``: the scalar loss mean_b max(-A r, -A clip(r, 1±ε)); ``stats`` holds ``ratio`` (mean
        r), ``approx_kl`` (½ mean (log r)², the estimator of the authors' code) and ``clipfrac`` (fraction of
        |r - 1| > ε), all detached scalars.

    >>> loss, stats = ppo_clip_loss(torch.log(torch.tensor([1.5])), torch.zeros(1), torch.ones(1), 0.2)
    >>> round(float(loss), 4), float(stats["clipfrac"])  # positive advantage: the ratio is capped at 1.2
    (-1.2, 1.0)
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "ratio": ratio.mean(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
        }
    return loss, stats


class DDPOIS(DiffusionAgent):
    """DDPO with importance sampling and PPO clipping (the paper's best-performing variant)."""

    algorithm: ClassVar[str] = "ddpo_is"

    def train_on_rollouts(self, epoch: int) -> dict[str, float]:
        cfg, buffer = self.config, self.buffer
        buffer.compute_returns_and_advantage(self.normalizer, cfg.adv_clip_max)
        clip_range = self.current_clip_range(epoch)
        logs: dict[str, list[float]] = {"loss": [], "approx_kl": [], "clipfrac": [], "kl_ref": [], "grad_norm": []}
        first_ratio = float("nan")
        for inner in range(cfg.num_inner_epochs):
            minibatches = list(
                buffer.get(cfg.train_batch_size, cfg.timestep_fraction, self.shuffle_generator(epoch, inner))
            )
            for mb_index, minibatch in enumerate(minibatches):
                # Gradient accumulation: the loss of one step is scaled by 1/(K·G) so that one optimizer step
                # follows the mean loss over K timesteps × G minibatches.
                scale = 1.0 / (minibatch.num_timesteps * cfg.gradient_accumulation_steps)
                for j in range(minibatch.num_timesteps):
                    step = minibatch.step(j)
                    log_prob, out = self.step_log_prob(step)
                    loss, stats = ppo_clip_loss(log_prob, step.old_log_probs, step.advantages, clip_range)
                    if cfg.kl_coef > 0:
                        kl = self.kl_to_reference(step, out).mean()
                        loss = loss + cfg.kl_coef * kl
                        logs["kl_ref"].append(float(kl.detach()))
                    self.backward(loss * scale)
                    logs["loss"].append(float(loss.detach()))
                    logs["approx_kl"].append(float(stats["approx_kl"]))
                    logs["clipfrac"].append(float(stats["clipfrac"]))
                    if inner == 0 and mb_index == 0 and j == 0:
                        first_ratio = float(stats["ratio"])  # must be 1: the same policy sampled these actions
                last = mb_index == len(minibatches) - 1
                if (mb_index + 1) % cfg.gradient_accumulation_steps == 0 or last:
                    logs["grad_norm"].append(self.optimizer_step())
        metrics = {key: float(np.mean(values)) for key, values in logs.items() if values}
        metrics.update(clip_range=clip_range, first_ratio=first_ratio)
        return metrics


__all__ = ["DDPOIS", "ppo_clip_loss"]
