"""SB3's policy on the diffusion model: the DDIM step's Gaussian as an action distribution, and the policy.

:class:`DDIMGaussianDistribution` is SB3's diagonal Gaussian with the DDIM step's mean and fixed σ_t, with
DDPO's log-prob convention; :class:`DiffusionActorCriticPolicy` is an ``ActorCriticPolicy`` whose actor is a
:class:`~diffusion_mdp.policy.DiffusionPolicy`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import Schedule
from torch import Tensor, nn

from diffusion_mdp.ddim import LogProbReduction, gaussian_log_prob
from diffusion_mdp.envs.flow_time import policy_timesteps
from diffusion_mdp.policy import DiffusionPolicy


class DDIMGaussianDistribution(DiagGaussianDistribution):
    """SB3's diagonal Gaussian with the DDIM step's mean μ_θ ``(B, C, h, w)`` and fixed σ_t ``(B, 1, 1, 1)``.

    ``log_prob`` reduces over latent dimensions like :class:`DiffusionPolicy` (``"mean"``: DDPO's
    convention, so PPO's ratio exp(Δ log π) matches DDPO-IS and its 1e-4 clip range; ``"sum"``: the true
    density, whose ratios are exp(D · Δ) and need a clip range about D = C·h·w times wider).

    Args:
        latent_shape: ``(C, h, w)``.
        reduction: ``"mean"`` or ``"sum"``.
    """

    def __init__(self, latent_shape: tuple[int, int, int], reduction: LogProbReduction = "mean") -> None:
        super().__init__(int(np.prod(latent_shape)))
        self.latent_shape = tuple(latent_shape)
        self.reduction: LogProbReduction = reduction
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    def proba_distribution(self, mean_actions: Tensor, std: Tensor) -> DDIMGaussianDistribution:  # type: ignore[override]
        """Set the distribution: ``mean_actions`` ``(B, C, h, w)``, ``std`` broadcastable to it."""
        self.mean, self.std = mean_actions, std.expand_as(mean_actions)
        self.distribution = torch.distributions.Normal(self.mean, self.std)
        return self

    def _as_latents(self, actions: Tensor) -> Tensor:
        # SB3's rollout buffer stores actions flattened to (B, C*h*w); the env takes (B, C, h, w).
        return actions.reshape(-1, *self.latent_shape)

    def log_prob(self, actions: Tensor) -> Tensor:
        """``(B,)`` log π(a | s), reduced over latent dimensions; gradients flow through μ_θ only."""
        assert self.mean is not None and self.std is not None
        return gaussian_log_prob(self._as_latents(actions), self.mean, self.std, self.reduction)

    def entropy(self) -> Tensor:
        """``(B,)`` entropy, reduced like the log-prob (constant in θ: σ_t is fixed by the schedule)."""
        assert self.std is not None
        per_dim = 0.5 + 0.5 * np.log(2 * np.pi) + torch.log(self.std)
        return per_dim.flatten(1).mean(1) if self.reduction == "mean" else per_dim.flatten(1).sum(1)

    def sample(self) -> Tensor:
        assert self.mean is not None and self.std is not None
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self) -> Tensor:
        assert self.mean is not None
        return self.mean


class DiffusionActorCriticPolicy(ActorCriticPolicy):
    """An SB3 ``ActorCriticPolicy`` whose actor is a :class:`DiffusionPolicy` (its UNet: SB3's parameters).

    Build it through ``PPO(DiffusionActorCriticPolicy, env, policy_kwargs=diffusion_policy_kwargs(env))``.
    The optimiser (``optimizer_class``, AdamW by default here) gets the UNet's *trainable* parameters (all,
    or only a LoRA adapter if one was added beforehand) plus the value head's.

    Args:
        observation_space, action_space, lr_schedule: Given by SB3.
        diffusion_policy: The actor (e.g. ``DiffusionPolicy.from_env(env.venv)``).
        prompts: The prompt strings in ``prompt_id`` order (``env.prompts``).
        value_head: ``"none"``: V ≡ 0, no critic (DDPO; use ``vf_coef=0``); ``"per_prompt"``: a learned
            scalar per prompt (a table V(c), zero-initialised): with γ = λ = 1 the advantage r - V(c) is
            a learned per-prompt baseline.
        optimizer_class, optimizer_kwargs: As in SB3.
        **kwargs: Other ``ActorCriticPolicy`` arguments (ignored net settings are accepted for SB3 compatibility).
    """

    action_dist: DDIMGaussianDistribution  # SB3 declares a Distribution; this policy's is always this one

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        diffusion_policy: DiffusionPolicy | None = None,
        prompts: Sequence[str] = (),
        value_head: Literal["none", "per_prompt"] = "none",
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
        optimizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if diffusion_policy is None:
            raise ValueError("pass policy_kwargs=diffusion_policy_kwargs(env) (a DiffusionPolicy and its prompts)")
        if value_head not in ("none", "per_prompt"):
            raise ValueError(f"value_head must be 'none' or 'per_prompt', got {value_head!r}")
        # SB3 builds its MLP and action net in _build(); ours is a no-op, the real build follows below.
        kwargs.setdefault("net_arch", [])
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs or {},
            **kwargs,
        )
        self.diffusion = diffusion_policy  # registers the UNet as a submodule (the text encoder stays out)
        self.prompts = list(prompts)
        self.value_head = value_head
        self.values = nn.Embedding(max(1, len(self.prompts)), 1)
        nn.init.zeros_(self.values.weight)
        latent_shape = tuple(action_space.shape)  # type: ignore[arg-type]
        self.action_dist = DDIMGaussianDistribution(latent_shape, diffusion_policy.log_prob_reduction)  # type: ignore[arg-type]
        self.values.requires_grad_(value_head == "per_prompt")
        # The value table is always handed over (a frozen UNet would otherwise leave AdamW with no parameters);
        # without a value head it gets no gradient and AdamW skips it.
        trainable = [p for p in self.diffusion.unet.parameters() if p.requires_grad] + list(self.values.parameters())
        # SB3 types optimizer_class as type[Optimizer], whose constructor takes no lr; the class takes one.
        make_optimizer: Callable[..., torch.optim.Optimizer] = self.optimizer_class
        self.optimizer = make_optimizer(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        """Nothing to build: the actor is the diffusion model, added after SB3's ``__init__``."""

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(prompts=self.prompts, value_head=self.value_head)
        return data

    # ----------------------------------------------------------------------------------------------
    def unpack(self, obs: Mapping[str, Tensor]) -> dict[str, Any]:
        """SB3 observations (from the env: ``timestep (B,)``; from the buffer: ``(B, 1)`` floats) → policy obs."""
        timesteps = policy_timesteps(self.diffusion.schedule, obs["timestep"])
        prompt_ids = torch.as_tensor(obs["prompt_id"]).reshape(-1).round().long()
        prompts = [self.prompts[int(i)] for i in prompt_ids]
        return {"latent": obs["latent"].float(), "timestep": timesteps, "prompt": prompts, "prompt_ids": prompt_ids}

    def get_distribution(self, obs: Mapping[str, Tensor]) -> DDIMGaussianDistribution:  # type: ignore[override]
        """π(· | s) = N(μ_θ(x_t, t, c), σ_t² I) for a batch of SB3 observations."""
        out = self.diffusion(self.unpack(obs))  # one CFG forward of the UNet, the DDIM mean and σ_t
        return self.action_dist.proba_distribution(out.mean, out.std)

    def predict_values(self, obs: Mapping[str, Tensor]) -> Tensor:  # type: ignore[override]
        """``(B, 1)`` V(s): zeros (no critic) or the per-prompt table."""
        prompt_ids = torch.as_tensor(obs["prompt_id"]).reshape(-1).round().long()
        values = self.values(prompt_ids.to(self.values.weight.device))
        return values if self.value_head == "per_prompt" else torch.zeros_like(values)

    def forward(self, obs: Mapping[str, Tensor], deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """Sample actions ``(B, C, h, w)``; return them with V(s) ``(B, 1)`` and log π(a | s) ``(B,)``."""
        distribution = self.get_distribution(obs)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, self.predict_values(obs), distribution.log_prob(actions)

    def evaluate_actions(self, obs: Mapping[str, Tensor], actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """PPO's training call: ``(V (B, 1), log π(a | s) (B,) with gradients, entropy (B,))``."""
        distribution = self.get_distribution(obs)
        return self.predict_values(obs), distribution.log_prob(actions), distribution.entropy()

    def _predict(self, observation: Mapping[str, Tensor], deterministic: bool = False) -> Tensor:  # type: ignore[override]
        return self.get_distribution(observation).get_actions(deterministic=deterministic)
