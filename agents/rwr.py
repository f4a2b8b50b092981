"""Reward-weighted regression baselines (DDPO, section 4.1; Peters & Schaal 2007; Lee et al. 2023).

RWR treats the whole denoising chain as one action and fine-tunes with the diffusion model's own
training loss on the sampled x_0, weighted by the reward:

    L = Σ_i w_i · E_{t, ε}[ ‖ ε̃_θ(√α_t x_0^i + √(1-α_t) ε, t, c_i) - target ‖² ]

- RWR:        w = softmax(r / β) over the epoch's samples (times n, so the mean weight is 1),
- sparse RWR: w_i ∝ 1[r_i ≥ q-th quantile of the epoch's rewards] (filter, then plain fine-tuning).

ε̃_θ is the classifier-free-guided prediction (guidance is on while training, as for DDPO: the paper found
training only the conditional branch degrades quickly; ``rwr_guided_loss=False`` trains ε_c instead).
``target`` follows the scheduler's prediction type (ε, v or x_0). x_0 is the sampler's final latent, or with
``rwr_reencode`` the VAE's encoding of the image it decodes to (the kind of latent the model was trained on).
Multi-round as in the paper: every epoch
samples fresh x_0 from the current model, then trains ``num_inner_epochs`` passes on it (the shared loop of
``update.py``); each pass draws one random t per sample and timestep slot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from diffusion_mdp.mdp import decode_latents, encode_images

from .base import _SEED_TAGS, DiffusionAgent, derived_seed
from .buffer import StepBatch


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
    weights: Tensor  # (n,) w of the epoch's samples, set by prepare_update
    targets: Tensor  # (n, C, h, w) the x_0 regressed on, set by prepare_update
    noise_generator: torch.Generator  # the epoch's training draws (t, ε)

    def sample_weights(self, rewards: Tensor) -> Tensor:
        return rwr_weights(rewards, self.config.rwr_beta)

    def prepare_update(self, epoch: int) -> dict[str, float]:
        """The epoch's sample weights w and the generator of the training noise (t, ε)."""
        # No advantages: μ = 0, σ = 1 leaves A = the return (the buffer shuffles only once they are set).
        self.buffer.compute_returns_and_advantage(lambda r, p, g: (np.zeros_like(r), np.ones_like(r)))
        self.weights = weights = self.sample_weights(self.buffer.episode_rewards.float()).to(self.device)
        # x_0 of the regression: the sampler's latents, or (rwr_reencode) the VAE's encoding of their images.
        self.targets = self.buffer.final_latents
        if self.config.rwr_reencode:
            vae = self.components.vae
            self.targets = torch.cat([
                encode_images(vae, decode_latents(vae, chunk)).to(self.targets.dtype)
                for chunk in self.targets.split(self.config.sample_batch_size)
            ])  # fmt: skip
        self.noise_generator = torch.Generator().manual_seed(derived_seed(self.config.seed, _SEED_TAGS["train"], epoch))
        return {
            "weight_max": float(weights.max()),
            "effective_samples": float(weights.sum() ** 2 / (weights**2).sum()),
        }

    def step_loss(self, step: StepBatch, epoch: int) -> tuple[Tensor, Mapping[str, Tensor]]:
        """mean_b w_i ‖ε̃_θ(x_t^i, t_i, c_i) - target_i‖² at a fresh t_i ~ U{0..999} and ε_i ~ N(0, I) per sample.

        Only the step's trajectories (``step.indices``) and prompts are used: RWR regresses on their x_0.
        """
        scheduler, idx = self.components.scheduler, step.indices
        x0 = self.targets[idx]
        # A fresh training timestep t ~ U{0..999} and noise ε for each sample (DDPM's loss).
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=self.noise_generator)
        eps = torch.randn(x0.shape, generator=self.noise_generator)
        t, eps = t.to(self.device), eps.to(self.device)
        noisy = scheduler.add_noise(x0, eps, t)
        if scheduler.config.prediction_type == "epsilon":
            target = eps
        elif scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, eps, t)
        else:
            target = x0
        # w of the regressed prediction: the sampling guidance (ε̃, the paper's) or 1 (the conditional ε_c).
        loss_guidance = None if self.config.rwr_guided_loss else 1.0
        with self.autocast():
            prediction = self.policy.predict(noisy, t, step.prompt_embeds, guidance_scale=loss_guidance)
        per_sample = ((prediction.float() - target) ** 2).mean(dim=(1, 2, 3))
        return (self.weights[idx] * per_sample).mean(), {}


class SparseRWR(RWR):
    """Sparse RWR: plain fine-tuning on the samples above a reward percentile (``algorithm='sparse_rwr'``)."""

    algorithm: ClassVar[str] = "sparse_rwr"

    def sample_weights(self, rewards: Tensor) -> Tensor:
        return sparse_rwr_weights(rewards, self.config.sparse_rwr_percentile)


__all__ = ["RWR", "SparseRWR", "rwr_weights", "sparse_rwr_weights"]
