"""``DenoisingVectorEnv``: N denoising trajectories batched natively (one UNet batch, one decode, one reward)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from gymnasium.envs.registration import EnvSpec
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from diffusion_mdp.ddim import DDIMSchedule
from diffusion_mdp.flow import FlowMatchSchedule
from diffusion_mdp.mdp import DEFAULT_REWARD, DenoisingMDP, decode_latents
from diffusion_mdp.models import DiffusionComponents
from diffusion_mdp.prompts import PromptSet
from diffusion_mdp.rewards import RewardFn

from .denoising import action_space_for, observation_space_for, portable_spec, reset_options


class DenoisingVectorEnv(VectorEnv):
    """N denoising episodes in one batch; see :class:`DenoisingEnv` for the MDP itself.

    Unlike ``SyncVectorEnv`` over N ``DenoisingEnv``, the batch is native: the N latents are one tensor, and
    at the end of the episodes the VAE decodes them in one call and the reward scores them in one call.
    All sub-environments start and end together (every episode lasts ``num_steps`` steps). Apart from
    that speed it behaves exactly as ``gym.make_vec(..., vectorization_mode="sync")`` with the same
    ``autoreset_mode``: the same observations, rewards, episode lengths and ``info`` layout.

    Seeding follows Gymnasium's convention: ``reset(seed=s)`` seeds sub-environment i with ``s + i``, and
    with the same actions the batch reproduces N ``DenoisingEnv`` seeded ``s, s + 1, ...`` exactly.
    ``get_rng_state()`` / ``set_rng_state()`` save and restore the N generators (exact resume).

    Observations are a dict of batched arrays: ``latent`` ``(N, C, h, w)`` float32, ``timestep`` ``(N,)``
    int64, ``prompt_id`` ``(N,)`` int64. The prompts' texts are ``info["prompt"]`` (an object array of N
    strings) after ``reset`` and at the last step, and ``env.prompts[prompt_id]`` at any time. With
    ``torch_obs=True`` (the fast mode) the observations are torch tensors on ``device`` and actions may be
    tensors on ``device``: a GPU rollout never copies latents through NumPy.

    ``reset(options=...)``: ``{"prompt_ids": (N,) ints}`` fixes the prompts, ``{"noise": (N, C, h, w)}`` the
    initial latents x_T (fixed-noise evaluation); the generators draw as usual either way.

    Autoreset (the ``autoreset_mode`` attribute and ``metadata["autoreset_mode"]``, as Gymnasium's own
    vector envs):
    - ``AutoresetMode.NEXT_STEP`` (default, Gymnasium's default, accepted by ``gymnasium.wrappers.vector``):
      the step that ends the episodes returns their terminal observation; the *next* ``step`` ignores its
      actions and starts new episodes (reward 0, not terminated, ``info`` as after ``reset``).
    - ``AutoresetMode.SAME_STEP``: the step that ends the episodes returns the new episodes' first
      observation and ``info`` of ``reset``; the terminal observation is ``info["final_obs"]`` (a batched
      dict, like the observations) and the terminal info ``info["final_info"]``.
    - ``AutoresetMode.DISABLED``: after the last step, call ``reset()`` (the agents' mode).

    At the terminal step ``info`` holds ``image`` (uint8 ``(N, H, W, 3)``), ``prompt`` (N strings) and
    ``reward_info`` (arrays of N), each with a ``_<key>`` mask (all True), as Gymnasium's vector infos do.

    Args:
        num_envs: N.
        model, reward, prompts, num_steps, eta, device, components, reward_kwargs, defer_reward: as for
            ``DenoisingEnv``.
        torch_obs: Return torch observations on ``device`` (the fast mode).
        autoreset_mode: An ``AutoresetMode`` (or its string value), see above.
        render_mode: ``"rgb_array"``: ``render()`` returns the N current latents decoded.
    """

    _spec: EnvSpec | None = None

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
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        render_mode: str | None = None,
        components: DiffusionComponents | None = None,
        reward_kwargs: Mapping[str, Any] | None = None,
        defer_reward: bool = False,
    ) -> None:
        try:
            autoreset_mode = AutoresetMode(autoreset_mode)
        except ValueError as exc:
            modes = [mode.value for mode in AutoresetMode]
            raise ValueError(f"autoreset_mode must be one of {modes}, got {autoreset_mode!r}") from exc
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.mdp = DenoisingMDP(
            num_envs, model, reward, prompts, num_steps, eta, device, components, reward_kwargs, defer_reward
        )
        self.num_envs = num_envs
        self.torch_obs = torch_obs
        self.render_mode = render_mode
        self.autoreset_mode = autoreset_mode
        self.metadata = {"render_modes": ["rgb_array"], "autoreset_mode": autoreset_mode}
        self.single_observation_space = observation_space_for(self.mdp)
        self.single_action_space = action_space_for(self.mdp)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs = [seeding.np_random()[0] for _ in range(num_envs)]
        self._every = np.ones(num_envs, dtype=bool)
        self._autoreset_pending = False  # NEXT_STEP: the last step ended the episodes

    @property
    def schedule(self) -> DDIMSchedule | FlowMatchSchedule:
        """The MDP's schedule: DDIM's σ_t, α_t, α_{t-1}, t_prev and μ_θ per timestep (``diffusion_mdp.ddim``), or
        the flow SDE's (``diffusion_mdp.flow``) for SD3 / FLUX."""
        return self.mdp.schedule

    @property
    def components(self) -> DiffusionComponents:
        return self.mdp.components

    @property
    def device(self) -> torch.device:
        return self.mdp.device

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
        """The N sub-environments' generator states (NumPy ``bit_generator.state`` dicts)."""
        return [rng.bit_generator.state for rng in self._rngs]

    def set_rng_state(self, state: Sequence[dict[str, Any]]) -> None:
        """Restore the states from :meth:`get_rng_state`."""
        if len(state) != self.num_envs:
            raise ValueError(f"{self.num_envs} sub-environments but {len(state)} generator states")
        for rng, rng_state in zip(self._rngs, state, strict=True):
            rng.bit_generator.state = rng_state

    def _observation(self) -> dict[str, Any]:
        mdp = self.mdp
        timesteps = np.full(self.num_envs, mdp.timestep, dtype=np.int64)
        if self.torch_obs:
            return {
                "latent": mdp.latents.clone(),
                "timestep": torch.from_numpy(timesteps).to(mdp.device),
                "prompt_id": torch.from_numpy(mdp.prompt_ids.copy()).to(mdp.device),
            }
        return {
            "latent": mdp.latents.cpu().numpy().astype(np.float32),
            "timestep": timesteps,
            "prompt_id": mdp.prompt_ids.copy(),
        }

    def _reset_info(self) -> dict[str, Any]:
        return {"prompt": _array(self.mdp.prompt_list), "_prompt": self._every}

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start N new episodes. ``seed``: an int (sub-env i gets ``seed + i``) or one seed per sub-env.

        ``options``: ``{"prompt_ids": (N,) ints, "noise": (N, C, h, w) x_T}``, both optional.
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
        self.mdp.reset(self._rngs, **reset_options(options, self.num_envs))
        self._autoreset_pending = False
        return self._observation(), self._reset_info()

    def step(
        self, actions: np.ndarray | torch.Tensor
    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        truncations = np.zeros(self.num_envs, dtype=bool)
        if self._autoreset_pending:  # NEXT_STEP: this step's actions are ignored, new episodes start
            self.mdp.reset(self._rngs)
            self._autoreset_pending = False
            return self._observation(), np.zeros(self.num_envs), truncations.copy(), truncations, self._reset_info()
        rewards, terminated, batch_info = self.mdp.step(actions)
        terminations = np.full(self.num_envs, terminated)
        if not terminated:
            return self._observation(), rewards, terminations, truncations, {}
        info = _vector_info(batch_info, self._every)
        observation = self._observation()
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._autoreset_pending = True
        elif self.autoreset_mode == AutoresetMode.SAME_STEP:
            final_obs, final_info = observation, info
            self.mdp.reset(self._rngs)
            observation = self._observation()
            info = {
                "final_obs": final_obs,
                "_final_obs": self._every,
                "final_info": final_info,
                "_final_info": self._every,
                **self._reset_info(),
            }
        return observation, rewards, terminations, truncations, info

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode is None:
            return None
        return tuple(decode_latents(self.mdp.components.vae, self.mdp.latents))


def _array(values: Sequence[Any]) -> np.ndarray:
    """N per-episode values as a ``(N,)`` array; strings and dicts as an object array (as Gymnasium's infos)."""
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array


def _vector_info(batch_info: Mapping[str, Any], every: np.ndarray) -> dict[str, Any]:
    """The MDP's batch info as Gymnasium vector info: every entry an array of N, with a ``_<key>`` mask."""
    num_envs = len(every)
    info: dict[str, Any] = {}
    for key, value in batch_info.items():
        if isinstance(value, Mapping):
            info[key] = _vector_info(value, every)
        elif isinstance(value, np.ndarray) and value.ndim >= 1 and len(value) == num_envs:
            info[key] = value
        elif isinstance(value, list | tuple) and len(value) == num_envs:
            info[key] = np.asarray(value) if value and isinstance(value[0], int | float | np.number) else _array(value)
        elif isinstance(value, torch.Tensor) and value.ndim >= 1 and len(value) == num_envs:
            info[key] = value.detach().cpu().numpy()
        else:  # one value for the whole batch: every sub-env gets it
            info[key] = _array([value] * num_envs)
        info[f"_{key}"] = every
    return info
