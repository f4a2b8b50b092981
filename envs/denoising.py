"""``DenoisingEnv``: one denoising trajectory as a Gymnasium environment."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from diffusion_mdp.mdp import DEFAULT_REWARD, LATENT_BOUND, DenoisingMDP, decode_latents
from diffusion_mdp.models import DiffusionComponents
from diffusion_mdp.prompts import PROMPT_CHARSET, PromptSet
from diffusion_mdp.rewards import RewardFn


def observation_space_for(mdp: DenoisingMDP) -> spaces.Dict:
    """The single-episode observation space of an MDP (shared by the single and vector environments)."""
    return spaces.Dict(
        {
            "latent": spaces.Box(-LATENT_BOUND, LATENT_BOUND, mdp.latent_shape, dtype=np.float32),
            # Flow-matching schedules start at t = num_train_timesteps (σ = 1): one more value.
            "timestep": spaces.Discrete(max(mdp.schedule.num_train_timesteps, int(mdp.schedule.timesteps.max()) + 1)),
            "prompt": spaces.Text(max_length=mdp.prompts.max_length, charset=PROMPT_CHARSET),
            "prompt_id": spaces.Discrete(len(mdp.prompts)),
        }
    )


def action_space_for(mdp: DenoisingMDP) -> spaces.Box:
    """The single-episode action space: the next latent."""
    return spaces.Box(-LATENT_BOUND, LATENT_BOUND, mdp.latent_shape, dtype=np.float32)


class DenoisingEnv(gym.Env[dict[str, Any], np.ndarray]):
    """Denoising a latent from noise to an image, one stochastic DDIM step per action.

    ## Description

    The denoising MDP of *Training Diffusion Models with Reinforcement Learning* (Black et al., 2023,
    section 4.1). An episode starts from pure noise x_T and a prompt c; at each step the agent chooses the
    next, less noisy latent x_{t-1}. A diffusion model's sampler is one policy for this MDP — the
    Gaussian of a stochastic DDIM step, :class:`diffusion_mdp.policy.DiffusionPolicy` — and RL fine-tunes it.
    After the last step the latent x_0 is decoded to an image and scored.

    ## Action Space

    ``Box(-1e4, 1e4, (C, h, w), float32)``: the next latent x_{t-1} (for the bundled model 4×16×16). Any
    finite float array of that shape is accepted; NaN/inf or a wrong shape raise ``ValueError``.

    ## Observation Space

    ``Dict`` with
    - ``latent``: ``Box(-1e4, 1e4, (C, h, w), float32)``, the current latent x_t;
    - ``timestep``: ``Discrete(num_train_timesteps)``, the diffusion timestep t (0 in the final observation);
    - ``prompt``: ``Text`` (printable ASCII), the prompt c;
    - ``prompt_id``: ``Discrete(len(prompts))``, the prompt's index in the prompt set (for RL code that
      cannot read text).

    ## Rewards

    0 at every step but the last; then r(x_0, c) from the chosen reward (default: JPEG compressibility,
    -kB at quality 95). ``info`` at the last step holds ``image`` (uint8 ``(H, W, 3)``), ``reward_info``
    and ``prompt``.

    ## Starting State

    c drawn uniformly from the prompt set, x_T ~ N(0, I), t = the schedule's first (largest) timestep.
    Both are drawn from the environment's seeded generator.

    ## Episode End

    The episode terminates after exactly ``num_steps`` steps (no truncation). Stepping again without
    ``reset()`` raises ``EpisodeEndedError``.

    ## Arguments

    ```python
    import diffusion_mdp, gymnasium as gym
    env = gym.make("DenoisingMDP-v0", reward="jpeg_compressibility", model="tiny-shapes",
                   prompts="shapes_train", num_steps=20, eta=1.0, render_mode="rgb_array")
    ```

    - ``model``: ``"tiny-shapes"`` (bundled, default), a Stable Diffusion pipeline folder, or a hub id.
    - ``reward``: a registered name (``diffusion_mdp.rewards.available_rewards()``), a callable, or a
      ``{name: weight}`` dict.
    - ``prompts``: a registered prompt set, a list of prompts, or a ``.txt`` file; default: the model's.
    - ``num_steps``: T, the number of DDIM steps; ``eta``: DDIM η (> 0) of the policy's schedule.
    - ``device``: where the VAE runs; ``components``: already loaded model components to share.
    - ``render_mode``: ``"rgb_array"`` renders the current latent x_t decoded by the VAE.

    ## Version History

    - v0: initial version.
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        reward: str | RewardFn | Mapping[str, float] = DEFAULT_REWARD,
        prompts: str | os.PathLike[str] | Sequence[str] | PromptSet | None = None,
        num_steps: int = 20,
        eta: float = 1.0,
        device: torch.device | str = "cpu",
        render_mode: str | None = None,
        components: DiffusionComponents | None = None,
        reward_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.mdp = DenoisingMDP(1, model, reward, prompts, num_steps, eta, device, components, reward_kwargs)
        self.observation_space = observation_space_for(self.mdp)
        self.action_space = action_space_for(self.mdp)

    # Convenience accessors for RL code (``env.unwrapped.schedule`` etc.).
    @property
    def schedule(self) -> Any:
        return self.mdp.schedule

    @property
    def components(self) -> DiffusionComponents:
        return self.mdp.components

    def _observation(self) -> dict[str, Any]:
        return {
            "latent": self.mdp.latents[0].cpu().numpy().astype(np.float32),
            "timestep": np.int64(self.mdp.timestep),
            "prompt": self.mdp.prompt_list[0],
            "prompt_id": np.int64(self.mdp.prompt_ids[0]),
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        self.mdp.reset([self.np_random])
        return self._observation(), {}

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        action = np.asarray(action) if not isinstance(action, torch.Tensor) else action
        expected = self.mdp.latent_shape
        if tuple(action.shape) != expected:
            raise ValueError(f"action must have shape {expected} (the next latent x_{{t-1}}), got {action.shape}")
        rewards, terminated, batch_info = self.mdp.step(action[None])
        info: dict[str, Any] = {}
        if terminated:
            info = {
                "image": batch_info["image"][0],
                "prompt": batch_info["prompt"][0],
                "reward_info": {k: _first(v) for k, v in batch_info["reward_info"].items()},
            }
        return self._observation(), float(rewards[0]), terminated, False, info

    def render(self) -> np.ndarray | None:  # type: ignore[override]
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode; pass render_mode='rgb_array' to gym.make")
            return None
        return decode_latents(self.mdp.components.vae, self.mdp.latents[:1])[0]


def _first(value: Any) -> Any:
    """The first sample's entry of a per-sample info value (scalars pass through)."""
    if isinstance(value, np.ndarray | list | tuple) and len(value) == 1:
        return value[0]
    return value
