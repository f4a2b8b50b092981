"""``DenoisingEnv``: one denoising trajectory as a Gymnasium environment."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec

from diffusion_mdp.ddim import DDIMSchedule
from diffusion_mdp.flow import FlowMatchSchedule
from diffusion_mdp.mdp import DEFAULT_REWARD, LATENT_BOUND, DenoisingMDP, decode_latents
from diffusion_mdp.models import DiffusionComponents
from diffusion_mdp.prompts import PromptSet
from diffusion_mdp.rewards import RewardFn


def observation_space_for(mdp: DenoisingMDP) -> spaces.Dict:
    """The single-episode observation space of an MDP (shared by the single and vector environments).

    Arrays only (every array-based RL library stores them); the prompt's text is ``info["prompt"]`` at
    reset and at the last step, and ``env.unwrapped.prompts[prompt_id]`` at any time.
    """
    return spaces.Dict(
        {
            "latent": spaces.Box(-LATENT_BOUND, LATENT_BOUND, mdp.latent_shape, dtype=np.float32),
            # Flow-matching schedules start at t = num_train_timesteps (σ = 1): one more value.
            "timestep": spaces.Discrete(max(mdp.schedule.num_train_timesteps, int(mdp.schedule.timesteps.max()) + 1)),
            "prompt_id": spaces.Discrete(len(mdp.prompts)),
        }
    )


def action_space_for(mdp: DenoisingMDP) -> spaces.Box:
    """The single-episode action space: the next latent."""
    return spaces.Box(-LATENT_BOUND, LATENT_BOUND, mdp.latent_shape, dtype=np.float32)


def portable_spec(spec: EnvSpec | None) -> EnvSpec | None:
    """``spec`` with loaded ``components`` replaced by ``model=<their source>`` and paths as strings.

    ``gym.make`` records every keyword in ``env.spec.kwargs``; model components are torch modules, which
    JSON cannot hold. Their source (a folder, a hub id or ``"tiny-shapes"``) loads the same model again, so
    ``spec.to_json()`` and ``gym.make(env.spec)`` work.
    """
    if spec is None:
        return spec
    kwargs = {key: os.fspath(value) if isinstance(value, os.PathLike) else value for key, value in spec.kwargs.items()}
    components = kwargs.pop("components", None)
    if components is not None:
        kwargs["model"] = str(getattr(components, "source", kwargs.get("model")))
    return dataclasses.replace(spec, kwargs=kwargs)


def reset_options(options: Mapping[str, Any] | None, num_envs: int) -> dict[str, Any]:
    """Check ``reset(options=...)``: ``prompt_ids`` (N ints, or one int when N = 1) and ``noise`` (N x_T).

    Raises:
        ValueError: An unknown option (the message lists the known ones).
    """
    options = dict(options or {})
    unknown = sorted(set(options) - {"prompt_ids", "noise"})
    if unknown:
        raise ValueError(f"unknown reset options {unknown}; the known ones are 'prompt_ids' and 'noise'")
    prompt_ids, noise = options.get("prompt_ids"), options.get("noise")
    if prompt_ids is not None:
        prompt_ids = np.asarray(torch.as_tensor(prompt_ids).cpu(), dtype=np.int64).reshape(-1)
    if noise is not None and num_envs == 1 and np.ndim(noise) == 3:
        noise = noise[None]  # a single env's x_T (C, h, w)
    return {"prompt_ids": prompt_ids, "noise": noise}


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

    ``Dict`` of arrays, which every array-based RL library stores:
    - ``latent``: ``Box(-1e4, 1e4, (C, h, w), float32)``, the current latent x_t;
    - ``timestep``: ``Discrete(num_train_timesteps)``, the diffusion timestep t (0 in the final observation);
    - ``prompt_id``: ``Discrete(len(prompts))``, the prompt c's index in the prompt set.

    The prompt's text is not an observation (a ``Text`` space is refused by SB3, TorchRL and most array
    wrappers): it is ``info["prompt"]`` after ``reset`` and at the last step, and
    ``env.unwrapped.prompts[obs["prompt_id"]]`` at any time (a list lookup).

    ## Rewards

    0 at every step but the last; then r(x_0, c) from the chosen reward (default: JPEG compressibility,
    -kB at quality 95). ``info`` at the last step holds ``image`` (uint8 ``(H, W, 3)``), ``reward_info``
    and ``prompt``. With ``defer_reward=True`` the last step's reward is 0 and ``info`` holds ``image``,
    ``prompt`` and ``metadata`` to score later with ``env.unwrapped.mdp.score``.

    ## Starting State

    c drawn uniformly from the prompt set, x_T ~ N(0, I), t = the schedule's first (largest) timestep.
    Both are drawn from the environment's seeded generator. ``reset(options=...)`` may fix them:
    ``{"prompt_ids": [i]}`` (or ``i``) the prompt, ``{"noise": x_T}`` (``(C, h, w)``) the noise; the
    generator draws as usual, so later episodes are unchanged. ``get_rng_state()`` / ``set_rng_state()``
    save and restore the generator (exact resume).

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
    - ``num_steps``: T, the number of DDIM steps; ``eta``: DDIM η of the policy's schedule (> 0 to train;
      0 for deterministic evaluation, whose actions are ``schedule.mean(...)``).
    - ``device``: where the VAE runs; ``components``: already loaded model components to share
      (``env.spec`` records their ``source`` as ``model``, so ``env.spec.to_json()`` works).
    - ``render_mode``: ``"rgb_array"`` renders the current latent x_t decoded by the VAE.
    - ``defer_reward``: return the last step's images instead of scoring them (see Rewards).

    ## Version History

    - v0: initial version. The observation holds arrays only (the prompt text moved to ``info``).
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 4}  # noqa: RUF012
    _spec: EnvSpec | None = None

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
        defer_reward: bool = False,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.mdp = DenoisingMDP(
            1, model, reward, prompts, num_steps, eta, device, components, reward_kwargs, defer_reward
        )
        self.observation_space = observation_space_for(self.mdp)
        self.action_space = action_space_for(self.mdp)

    # Public accessors for RL code (``env.unwrapped.schedule`` etc.).
    @property
    def schedule(self) -> DDIMSchedule | FlowMatchSchedule:
        """The MDP's schedule: DDIM's σ_t, α_t, α_{t-1}, t_prev and μ_θ per timestep (``diffusion_mdp.ddim``), or
        the flow SDE's (``diffusion_mdp.flow``) for SD3 / FLUX."""
        return self.mdp.schedule

    @property
    def components(self) -> DiffusionComponents:
        return self.mdp.components

    @property
    def prompts(self) -> list[str]:
        """The prompt set's texts in ``prompt_id`` order."""
        return self.mdp.prompts.prompts

    @property
    def spec(self) -> EnvSpec | None:  # type: ignore[override]
        return self._spec

    @spec.setter
    def spec(self, value: EnvSpec | None) -> None:
        self._spec = portable_spec(value)

    def get_rng_state(self) -> list[Mapping[str, Any]]:
        """The state of the environment's generator (one entry, like the vector env's list)."""
        return [self.np_random.bit_generator.state]

    def set_rng_state(self, state: Sequence[dict[str, Any]]) -> None:
        """Restore a state from :meth:`get_rng_state`."""
        if len(state) != 1:
            raise ValueError(f"a single env has one generator, got {len(state)} states")
        self.np_random.bit_generator.state = state[0]

    def _observation(self) -> dict[str, Any]:
        return {
            "latent": self.mdp.latents[0].cpu().numpy().astype(np.float32),
            "timestep": np.int64(self.mdp.timestep),
            "prompt_id": np.int64(self.mdp.prompt_ids[0]),
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start an episode. ``options``: ``{"prompt_ids": [i] or i, "noise": x_T (C, h, w)}``, both optional."""
        super().reset(seed=seed)
        self.mdp.reset([self.np_random], **reset_options(options, 1))
        return self._observation(), {"prompt": self.mdp.prompt_list[0]}

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        action = np.asarray(action) if not isinstance(action, torch.Tensor) else action
        expected = self.mdp.latent_shape
        if tuple(action.shape) != expected:
            raise ValueError(f"action must have shape {expected} (the next latent x_{{t-1}}), got {action.shape}")
        rewards, terminated, batch_info = self.mdp.step(action[None])
        info: dict[str, Any] = {}
        if terminated:
            info = {
                key: {k: _first(v) for k, v in value.items()} if isinstance(value, dict) else _first(value)
                for key, value in batch_info.items()
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
