"""Flow-GRPO (Liu et al. 2025): group advantages, PPO-clip on per-step ratios, a KL leash, an SDE window.

Flow-GRPO trains flow-matching models (SD3, FLUX) through the SDE of ``diffusion_mdp/flow.py``, whose steps
are Gaussian policies like DDIM's; the loss is GRPO's. For each prompt c, k trajectories are sampled
(``advantage_mode="group"``, ``group_size=k``) and each step (s_t, a_t) of trajectory i gets

    A_i      = (r_i - mean_{j in group(c)} r_j) / (std_{j in group(c)} r_j + 1e-6)       (group advantage)
    ratio_t  = π_θ(a_t | s_t) / π_old(a_t | s_t)
    L        = E_t[ max(-A_i ratio_t, -A_i clip(ratio_t, 1 ± ε)) ] + β E_t[ KL(π_θ(· | s_t) ‖ π_ref(· | s_t)) ]

with π_ref the pre-trained model (the network with its LoRA adapter disabled) and, both policies being
Gaussians of the same std at a step, KL = ‖μ_θ - μ_ref‖² / (2 std²) (mean over latent dimensions, like the
log-probs). Advantages are clipped to ± ``adv_clip_max``; β = ``kl_coef``, ε = ``clip_range``.

**The SDE window** (Flow-GRPO-Fast; MixGRPO slides it), the base class's for every algorithm. With
``sde_window_size = K > 0`` each epoch draws a window of K consecutive steps (start uniform in
0..``sde_window_max_start``, seeded by (seed, epoch)); the rollouts sample with the SDE (DDIM: η) on the window
and deterministically elsewhere (fewer noisy steps, sharper credit assignment), and only the window's steps are
trained on.

The rollouts, the window, minibatching, optimizer step, checkpoints and evaluation are the base class's; this
file is the loss (:func:`flow_grpo_loss`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import DiffusionAgent
from .buffer import StepBatch
from .config import ConfigError
from .ddpo_is import ppo_clip_loss


def flow_grpo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    clip_range: float,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-GRPO's loss on one step of b trajectories: PPO-clip on the ratio plus β · KL to the reference.

    Args:
        log_probs: ``(b,)`` log π_θ(a_t | s_t) (with gradients).
        old_log_probs: ``(b,)`` log π_old(a_t | s_t) from sampling time.
        advantages: ``(b,)`` the group advantages A_i.
        clip_range: ε.
        kl: ``(b,)`` KL(π_θ ‖ π_ref) at this step (with gradients), or None when ``kl_coef`` is 0.
        kl_coef: β.

    Returns:
        ``(loss, stats)``: the scalar loss and detached scalars ``policy_loss``, ``kl``, ``ratio``,
        ``approx_kl``, ``clipfrac``.

    >>> loss, stats = flow_grpo_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0]), 0.2,
    ...                              kl=torch.tensor([0.5, 1.5]), kl_coef=0.1)
    >>> round(float(loss), 4), float(stats["ratio"])  # ratio 1: the surrogate is -mean(A) = 0, plus 0.1 · 1
    (0.1, 1.0)
    """
    policy_loss, stats = ppo_clip_loss(log_probs, old_log_probs, advantages, clip_range)
    loss = policy_loss
    kl_mean = torch.zeros((), device=log_probs.device)
    if kl is not None and kl_coef > 0:
        kl_mean = kl.mean()
        loss = loss + kl_coef * kl_mean
    stats = {**stats, "policy_loss": policy_loss.detach(), "kl": kl_mean.detach()}
    return loss, stats


class FlowGRPO(DiffusionAgent):
    """Flow-GRPO on any model of the library (flow matching or DDIM), with the base class's SDE window."""

    algorithm: ClassVar[str] = "flow_grpo"
    # The first step's ratio must be 1: the policy that sampled those actions scores them.
    first_step_metrics: ClassVar[tuple[str, ...]] = ("ratio",)

    def __init__(self, config: Any, components: Any = None) -> None:
        if config.advantage_mode != "group":
            raise ConfigError(
                "flow_grpo compares the k samples of each prompt: set advantage_mode='group' and group_size=k"
            )
        super().__init__(config, components)

    # ------------------------------------------------------------------------------------------
    # Training: the shared loop of update.py over the SDE window's steps (the base class's), with this loss
    # ------------------------------------------------------------------------------------------
    def prepare_update(self, epoch: int) -> dict[str, float]:
        super().prepare_update(epoch)  # 1. group advantages A_i, the same for every step of trajectory i
        return {"clip_range": self.current_clip_range(epoch)}

    def step_loss(self, step: StepBatch, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """2. log π_θ at the stored action; 3. PPO-clip plus β KL to π_ref's mean at the same state."""
        log_prob, out = self.step_log_prob(step)
        kl = self.kl_to_reference(step, out) if self.config.kl_coef > 0 else None
        loss, stats = flow_grpo_loss(
            log_prob, step.old_log_probs, step.advantages, self.current_clip_range(epoch), kl, self.config.kl_coef
        )
        stats["kl_ref"] = stats.pop("kl")
        return loss, stats


__all__ = ["FlowGRPO", "flow_grpo_loss"]
