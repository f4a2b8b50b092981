"""``DenoisingVectorEnv``: N denoising trajectories batched natively (one UNet batch, one decode, one reward)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from diffusion_mdp.mdp import DEFAULT_REWARD, DenoisingMDP, decode_latents
from diffusion_mdp.models import DiffusionComponents
from diffusion_mdp.prompts import PromptSet
from diffusion_mdp.rewards import RewardFn

from .denoising import action_space_for, observation_space_for


class DenoisingVectorEnv(VectorEnv):
    """N denoising episodes in one batch; see :class:`DenoisingEnv` for the MDP itself.

    Unlike ``SyncVectorEnv`` over N ``DenoisingEnv``, the batch is native: the N latents are one tensor, and
    at the end of the episodes the VAE decodes them in one call and the reward scores them in one call.
    All sub-environments start and end together (every episode lasts ``num_steps`` steps).

    Seeding follows Gymnasium's convention: ``reset(seed=s)`` seeds sub-environment i with ``s + i``, and
    with the same actions the batch reproduces N ``DenoisingEnv`` seeded ``s, s + 1, ...`` exactly.

    Observations are a dict of batched arrays: ``latent`` ``(N, C, h, w)`` float32, ``timestep`` ``(N,)``
    int64, ``prompt`` a tuple of N strings, ``prompt_id`` ``(N,)`` int64. With ``torch_obs=True`` (the fast
    mode) ``latent``, ``timestep`` and ``prompt_id`` are torch tensors on ``device`` and actions may be
    tensors on ``device``: a GPU rollout never copies latents through NumPy.

    Autoreset (``metadata["autoreset_mode"]``):
    - ``AutoresetMode.SAME_STEP`` (default): the step that ends the episodes returns the *new* episodes'
      first observation; the terminal observation is ``info["final_obs"]`` (a batched dict, like the
      observations) and ``info["final_info"]`` holds the terminal info.
    - ``AutoresetMode.DISABLED``: the terminal step returns the terminal observation; call ``reset()``.

    At the terminal step ``info`` holds ``image`` (uint8 ``(N, H, W, 3)``), ``prompt`` (N strings) and
    ``reward_info``, each with a ``_<key>`` mask (all True), as Gymnasium's vector infos do.

    Args:
        num_envs: N.
        model, reward, prompts, num_steps, eta, device, components, reward_kwargs: as for ``DenoisingEnv``.
        torch_obs: Return torch observations on ``device`` (the fast mode).
        autoreset_mode: ``AutoresetMode.SAME_STEP`` or ``AutoresetMode.DISABLED`` (or their string values).
        render_mode: ``"rgb_array"``: ``render()`` returns the N current latents decoded.
    """

    def __init__(
        self,
        num_envs: int = 1,
        model: str | os.PathLike[str] | None = None,
        reward: str | RewardFn | Mapping[str, float] = DEFAULT_REWARD,
        prompts: str | os.PathLike[str] | Sequence[str] | PromptSet | None = None,
        num_steps: int = 20,
        eta: float = 1.0,
        device: torch.device | str = "cpu",
        torch_obs: bool = False,
        autoreset_mode: AutoresetMode | str = AutoresetMode.SAME_STEP,
        render_mode: str | None = None,
        components: DiffusionComponents | None = None,
        reward_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        autoreset_mode = AutoresetMode(autoreset_mode)
        if autoreset_mode not in (AutoresetMode.SAME_STEP, AutoresetMode.DISABLED):
            raise ValueError(
                "DenoisingVectorEnv supports autoreset_mode SAME_STEP or DISABLED (all episodes end together), "
                f"got {autoreset_mode}"
            )
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.mdp = DenoisingMDP(num_envs, model, reward, prompts, num_steps, eta, device, components, reward_kwargs)
        self.num_envs = num_envs
        self.torch_obs = torch_obs
        self.render_mode = render_mode
        self.metadata = {"render_modes": ["rgb_array"], "autoreset_mode": autoreset_mode}
        self.single_observation_space = observation_space_for(self.mdp)
        self.single_action_space = action_space_for(self.mdp)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs = [seeding.np_random()[0] for _ in range(num_envs)]

    @property
    def schedule(self) -> Any:
        return self.mdp.schedule

    @property
    def components(self) -> DiffusionComponents:
        return self.mdp.components

    @property
    def device(self) -> torch.device:
        return self.mdp.device

    def _observation(self) -> dict[str, Any]:
        mdp = self.mdp
        timesteps = np.full(self.num_envs, mdp.timestep, dtype=np.int64)
        if self.torch_obs:
            return {
                "latent": mdp.latents.clone(),
                "timestep": torch.from_numpy(timesteps).to(mdp.device),
                "prompt": tuple(mdp.prompt_list),
                "prompt_id": torch.from_numpy(mdp.prompt_ids.copy()).to(mdp.device),
            }
        return {
            "latent": mdp.latents.cpu().numpy().astype(np.float32),
            "timestep": timesteps,
            "prompt": tuple(mdp.prompt_list),
            "prompt_id": mdp.prompt_ids.copy(),
        }

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start N new episodes. ``seed``: an int (sub-env i gets ``seed + i``) or one seed per sub-env.

        ``options={"prompt_ids": [...]}`` fixes each sub-env's prompt index (the noise is drawn as usual).
        """
        if seed is not None:
            if isinstance(seed, np.integer):  # np.int64 from NumPy code: the same as the int
                seed = int(seed)
            if isinstance(seed, bool | str | bytes | float) or not isinstance(seed, int | Sequence | np.ndarray):
                raise TypeError(
                    f"seed must be an int or a sequence of {self.num_envs} ints/None (one per sub-env), got {seed!r}"
                )
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            for s in seeds:
                if s is not None and (isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0):
                    raise ValueError(f"every seed must be a non-negative int or None, got {s!r} in {seed!r}")
            seeds = [None if s is None else int(s) for s in seeds]
            if len(seeds) != self.num_envs:
                raise ValueError(f"expected {self.num_envs} seeds, got {len(seeds)}")
            self._rngs = [
                seeding.np_random(s)[0] if s is not None else rng for s, rng in zip(seeds, self._rngs, strict=True)
            ]
        self.mdp.reset(self._rngs, prompt_ids=(options or {}).get("prompt_ids"))
        return self._observation(), {}

    def step(
        self, actions: np.ndarray | torch.Tensor
    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        rewards, terminated, batch_info = self.mdp.step(actions)
        terminations = np.full(self.num_envs, terminated)
        truncations = np.zeros(self.num_envs, dtype=bool)
        if not terminated:
            return self._observation(), rewards, terminations, truncations, {}
        every = np.ones(self.num_envs, dtype=bool)
        info: dict[str, Any] = {}
        for key, value in batch_info.items():
            info[key], info[f"_{key}"] = value, every
        observation = self._observation()
        if self.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP:
            final_info = info
            info = {
                "final_obs": observation,
                "_final_obs": every,
                "final_info": final_info,
                "_final_info": every,
            }
            info.update(final_info)
            self.mdp.reset(self._rngs)
            observation = self._observation()
        return observation, rewards, terminations, truncations, info

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode is None:
            return None
        return tuple(decode_latents(self.mdp.components.vae, self.mdp.latents))
