"""DDPO-IS: PPO-style clipped importance sampling on every denoising step (DDPO, section 4.2, eq. 4).

For a trajectory sampled by π_old and a step (s_t, a_t) = ((c, t, x_t), x_{t-1}):

    ratio_t  = π_θ(x_{t-1} | x_t, c) / π_old(x_{t-1} | x_t, c) = exp(log π_θ - log π_old)
    L^CLIP   = E_t[ max(-A ratio_t, -A clip(ratio_t, 1 - ε, 1 + ε)) ]      (minimised)

with A the trajectory's normalised terminal reward (every step has the same one, see ``advantages.py``).
The log-probs are means over latent dimensions (DDPO's convention), which is why ε is tiny (1e-4).
This file is the loss; the passes over the samples (``num_inner_epochs``, shuffled across samples and
time), the accumulation over a minibatch's timesteps and ``gradient_accumulation_steps`` minibatches, and
the AdamW steps are the shared loop of ``update.py`` (paper: 256 samples, 4 minibatches, 4 updates).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import DiffusionAgent
from .buffer import StepBatch


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
    # The first step's ratio must be 1: the policy that sampled those actions scores them.
    first_step_metrics: ClassVar[tuple[str, ...]] = ("ratio",)

    def prepare_update(self, epoch: int) -> dict[str, float]:
        super().prepare_update(epoch)  # A for every step: the normalised terminal reward
        return {"clip_range": self.current_clip_range(epoch)}

    def step_loss(self, step: StepBatch, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """L^CLIP (+ β KL(π_θ ‖ π_ref) with ``kl_coef`` = β > 0) on one step batch."""
        log_prob, out = self.step_log_prob(step)  # log π_θ(x_{t-1} | x_t, c), with gradients
        loss, stats = ppo_clip_loss(log_prob, step.old_log_probs, step.advantages, self.current_clip_range(epoch))
        if self.config.kl_coef > 0:
            kl = self.kl_to_reference(step, out).mean()
            loss = loss + self.config.kl_coef * kl
            stats["kl_ref"] = kl
        return loss, stats


__all__ = ["DDPOIS", "ppo_clip_loss"]
