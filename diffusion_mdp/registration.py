"""Registration of ``DenoisingMDP-v0`` with Gymnasium (done by ``import diffusion_mdp``)."""

from __future__ import annotations

import gymnasium as gym

ENV_ID = "DenoisingMDP-v0"


def register_envs() -> None:
    """Register ``DenoisingMDP-v0`` for ``gym.make`` (single env) and ``gym.make_vec`` (batched env).

    Idempotent: importing the package twice (or reloading it) does not re-register.
    """
    if ENV_ID in gym.registry:
        return
    gym.register(
        id=ENV_ID,
        entry_point="diffusion_mdp.envs.denoising:DenoisingEnv",
        vector_entry_point="diffusion_mdp.envs.vector:DenoisingVectorEnv",
        # No TimeLimit: an episode always ends after exactly num_steps denoising steps.
        disable_env_checker=False,
    )
