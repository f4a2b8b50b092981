"""Reward-weighted regression baselines (DDPO, section 4.1; Peters & Schaal 2007; Lee et al. 2023).

RWR treats the whole denoising chain as one action and fine-tunes with the diffusion model's own
training loss on the sampled x_0, weighted by the reward:

    L = Σ_i w_i · E_{t, ε}[ ‖ ε̃_θ(√α_t x_0^i + √(1-α_t) ε, t, c_i) - target ‖² ]

- RWR:        w = softmax(r / β) over the epoch's samples (times n, so the mean weight is 1),
- sparse RWR: w_i ∝ 1[r_i ≥ q-th quantile of the epoch's rewards] (filter, then plain fine-tuning).

ε̃_θ is the classifier-free-guided prediction (guidance is on while training, as for DDPO: the paper found
training only the conditional branch degrades quickly; ``rwr_guided_loss=False`` trains ε_c instead).
``target`` follows the scheduler's prediction type (ε, v or x_0). Multi-round as in the paper: every epoch
samples fresh x_0 from the current model, then trains ``num_inner_epochs`` passes on it; each pass draws one
random t per sample and timestep slot.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from .base import DiffusionAgent, derived_seed


def rwr_weights(rewards: Tensor, beta: float) -> Tensor:
    """Softmax(r / β) over the batch, scaled by n so the mean weight is 1. ``(n,)`` -> ``(n,)``.

    >>> rwr_weights(torch.tensor([0.0, 0.0]), 1.0).tolist()
    [1.0, 1.0]
    """
    return torch.softmax(rewards.double() / beta, dim=0).float() * len(rewards)


def sparse_rwr_weights(rewards: Tensor, percentile: float) -> Tensor:
    """1 for rewards ≥ the ``percentile`` quantile, else 0, rescaled to mean 1. ``(n,)`` -> ``(n,)``.

    >>> sparse_rwr_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.5).tolist()
    [0.0, 0.0, 2.0, 2.0]
    """
    keep = (rewards >= torch.quantile(rewards.double(), percentile)).float()
    return keep * len(rewards) / keep.sum()


class RWR(DiffusionAgent):
    """Reward-weighted regression with softmax weights (``algorithm='rwr'``)."""

    algorithm: ClassVar[str] = "rwr"

    def sample_weights(self, rewards: Tensor) -> Tensor:
        return rwr_weights(rewards, self.config.rwr_beta)

    def train_on_rollouts(self, epoch: int) -> dict[str, float]:
        cfg, buffer = self.config, self.buffer
        scheduler = self.components.scheduler
        # RWR needs no advantages, but get() shuffles only a ready buffer: batch stats are a harmless default.
        buffer.compute_returns_and_advantage(lambda r, p, g: (np.zeros_like(r), np.ones_like(r)))
        weights = self.sample_weights(buffer.episode_rewards.float()).to(self.device)
        x0 = buffer.final_latents
        # w of the regressed prediction: the sampling guidance (ε̃, the paper's) or 1 (the conditional ε_c).
        loss_guidance = None if cfg.rwr_guided_loss else 1.0
        noise_gen = torch.Generator().manual_seed(derived_seed(cfg.seed, 4, epoch))
        losses, grad_norms = [], []
        for inner in range(cfg.num_inner_epochs):
            minibatches = list(
                buffer.get(cfg.train_batch_size, cfg.timestep_fraction, self.shuffle_generator(epoch, inner))
            )
            for mb_index, minibatch in enumerate(minibatches):
                idx, slots = minibatch.indices, minibatch.num_timesteps
                scale = 1.0 / (slots * cfg.gradient_accumulation_steps)
                embeds = buffer.prompt_embeds[idx]
                for _ in range(slots):
                    # A fresh training timestep t ~ U{0..999} and noise ε for each sample (DDPM's loss).
                    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=noise_gen)
                    eps = torch.randn(x0[idx].shape, generator=noise_gen)
                    t, eps = t.to(self.device), eps.to(self.device)
                    noisy = scheduler.add_noise(x0[idx], eps, t)
                    if scheduler.config.prediction_type == "epsilon":
                        target = eps
                    elif scheduler.config.prediction_type == "v_prediction":
                        target = scheduler.get_velocity(x0[idx], eps, t)
                    else:
                        target = x0[idx]
                    with self.autocast():
                        prediction = self.policy.predict(noisy, t, embeds, guidance_scale=loss_guidance)
                    per_sample = ((prediction.float() - target) ** 2).mean(dim=(1, 2, 3))
                    loss = (weights[idx] * per_sample).mean()
                    self.backward(loss * scale)
                    losses.append(float(loss.detach()))
                if (mb_index + 1) % cfg.gradient_accumulation_steps == 0 or mb_index == len(minibatches) - 1:
                    grad_norms.append(self.optimizer_step())
        return {
            "loss": float(np.mean(losses)),
            "grad_norm": float(np.mean(grad_norms)),
            "weight_max": float(weights.max()),
            "effective_samples": float(weights.sum() ** 2 / (weights**2).sum()),
        }


class SparseRWR(RWR):
    """Sparse RWR: plain fine-tuning on the samples above a reward percentile (``algorithm='sparse_rwr'``)."""

    algorithm: ClassVar[str] = "sparse_rwr"

    def sample_weights(self, rewards: Tensor) -> Tensor:
        return sparse_rwr_weights(rewards, self.config.sparse_rwr_percentile)


__all__ = ["RWR", "SparseRWR", "rwr_weights", "sparse_rwr_weights"]
