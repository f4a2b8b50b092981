"""The keyword arguments under which stock SB3 computes DDPO: ``policy_kwargs``, ``PPO(...)``, ``A2C(...)``."""

from __future__ import annotations

from typing import Any, Literal

import torch
from stable_baselines3.common.vec_env import VecEnv

from diffusion_mdp.policy import DiffusionPolicy

from .vec_env import DenoisingSB3VecEnv, _adapter


def diffusion_policy_kwargs(
    env: DenoisingSB3VecEnv,
    guidance_scale: float = 5.0,
    lora_rank: int | None = 4,
    value_head: Literal["none", "per_prompt"] = "none",
    diffusion_policy: DiffusionPolicy | None = None,
) -> dict[str, Any]:
    """``policy_kwargs`` for :class:`DiffusionActorCriticPolicy` on ``env``'s model.

    Args:
        env: The adapter (its model, schedule and prompts are used).
        guidance_scale: CFG weight w during rollouts and training (as DDPO).
        lora_rank: Add a LoRA adapter of this rank (alpha = rank) to the UNet's attention and train only it
            (DDPO's setup); None trains the full UNet.
        value_head: See :class:`DiffusionActorCriticPolicy`.
        diffusion_policy: Use this actor instead of building one (its UNet is trained in place).
    """
    policy = diffusion_policy or DiffusionPolicy.from_env(_adapter(env).venv, guidance_scale=guidance_scale)
    if diffusion_policy is None:
        if lora_rank:
            from diffusion_mdp.lora import add_lora

            add_lora(policy.unet, lora_rank, float(lora_rank))
        else:
            policy.unet.requires_grad_(True)
    # AdamW with DDPO's weight decay (torch's default, 1e-2, would pull the LoRA towards 0 a hundred times harder).
    # Named explicitly: A2C swaps in RMSprop unless policy_kwargs names an optimizer.
    return {
        "diffusion_policy": policy,
        "prompts": _adapter(env).prompts,
        "value_head": value_head,
        "optimizer_class": torch.optim.AdamW,
        "optimizer_kwargs": {"weight_decay": 1e-4, "eps": 1e-8},
    }


# What PPO and A2C share under DDPO: γ = λ = 1 (every step's advantage is the terminal reward), no SB3
# re-normalisation, no critic, no entropy bonus, DDPO's gradient clip and LoRA learning rate.
_DDPO_ON_POLICY: dict[str, Any] = {
    "gamma": 1.0,
    "gae_lambda": 1.0,
    "normalize_advantage": False,
    "ent_coef": 0.0,
    "vf_coef": 0.0,
    "max_grad_norm": 1.0,
    "learning_rate": 3e-4,
    "device": "cpu",
}


def ddpo_ppo_kwargs(env: DenoisingSB3VecEnv, batch_size: int | None = None, **overrides: Any) -> dict[str, Any]:
    """``PPO(...)`` settings under which SB3's PPO computes DDPO-IS's loss.

    - ``n_steps = T``: one rollout = one batch of N full episodes (DDPO's sample batch).
    - ``gamma = gae_lambda = 1``: every step's advantage is the terminal reward the env hands over (the
      per-prompt normalised one when the adapter normalises), exactly DDPO's advantage.
    - ``normalize_advantage=False``: SB3 would re-normalise each *minibatch*; DDPO normalises per prompt.
    - ``vf_coef=0``, ``ent_coef=0``: no critic, no entropy bonus (σ_t is fixed anyway).
    - ``clip_range=1e-4``: DDPO's ε for mean-over-dims log-probs; ``max_grad_norm=1``, ``n_epochs=1``,
      lr 3e-4 (DDPO's LoRA settings).

    Args:
        env: The adapter.
        batch_size: SB3 minibatch size in (step, episode) pairs; default N·T (one optimiser step per rollout).
        **overrides: Any other ``PPO`` keyword.
    """
    n_steps = _adapter(env).mdp.num_steps
    return {
        "n_steps": n_steps,
        "batch_size": batch_size or n_steps * env.num_envs,
        "n_epochs": 1,
        "clip_range": 1e-4,
        **_DDPO_ON_POLICY,
        **overrides,
    }


def ddpo_a2c_kwargs(env: VecEnv, **overrides: Any) -> dict[str, Any]:
    """``A2C(...)`` settings under which SB3's A2C computes DDPO-SF's loss (REINFORCE with DDPO's advantages).

    A2C's policy loss is -(A · log π).mean() over one rollout: with ``n_steps = T``, γ = λ = 1, no critic and
    the adapter's normalised terminal reward as A, that is DDPO-SF, one update per batch of N episodes.
    The optimiser is the one :func:`diffusion_policy_kwargs` names (AdamW): A2C's RMSprop default only
    applies when ``policy_kwargs`` names none. A2C has no ``batch_size``, ``n_epochs`` or ``clip_range``.

    Args:
        env: The adapter (or a wrapper of it).
        **overrides: Any other ``A2C`` keyword.
    """
    return {"n_steps": _adapter(env).mdp.num_steps, **_DDPO_ON_POLICY, **overrides}
