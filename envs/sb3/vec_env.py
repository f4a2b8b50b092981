"""The denoising MDP's N batched episodes as one SB3 ``VecEnv`` (:class:`DenoisingSB3VecEnv`)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from diffusion_mdp.envs.flow_time import convert_observation
from diffusion_mdp.envs.flow_time import observation_space as sb3_observation_space
from diffusion_mdp.envs.vector import DenoisingVectorEnv
from diffusion_mdp.mdp import DenoisingMDP

from .actor_critic import DiffusionActorCriticPolicy
from .normalization import RewardNormalization, _normalize


class DenoisingSB3VecEnv(VecEnv):
    """The denoising MDP's N batched episodes as an SB3 ``VecEnv``.

    Observations: ``Dict(latent=Box((C, h, w)), timestep=Discrete(num_train_timesteps),
    prompt_id=Discrete(len(prompts)))``, NumPy, batched; for flow-matching models ``timestep`` is the float
    model time t = 1000 σ and ``sigma`` is added (``diffusion_mdp.envs.flow_time``). Actions: ``(N, C, h, w)``
    next latents. Episodes end together after T steps; the step that ends them returns the next episodes' first
    observation and puts the terminal one in ``infos[i]["terminal_observation"]`` (SB3's convention).

    Args:
        num_envs: N.
        reward_normalization: What the terminal reward handed to SB3 is: ``"per_prompt"`` (DDPO's stat
            tracker: (r - μ_c) / σ_c over the prompt's recent rewards), ``"group"`` (statistics of the
            ``group_size`` samples of the prompt in this batch, GRPO), ``"batch"`` ((r - μ) / σ over the N
            episodes), or ``"none"`` (the raw reward). Normalised rewards are clipped to ± ``adv_clip_max``.
        group_size: k > 1: every batch of N episodes holds k episodes of each of N / k prompts (drawn
            uniformly), as the library's ``advantage_mode="group"`` does, so each prompt's statistics are
            available at once; 1: each episode draws its own prompt.
        stat_buffer_size: Per-prompt tracker: rewards kept per prompt.
        stat_min_count: Per-prompt tracker: below this many, use the batch statistics.
        adv_clip_max: Clip of normalised rewards (DDPO's advantage clip).
        **env_kwargs: Everything else goes to :class:`~diffusion_mdp.envs.DenoisingVectorEnv` (``model``,
            ``reward``, ``prompts``, ``num_steps``, ``eta``, ``components``, ...).

    Attributes:
        venv: The wrapped ``DenoisingVectorEnv`` (its ``mdp`` holds the prompt set, schedule and model).
        last_images: uint8 ``(N, H, W, 3)`` images of the last finished episodes (None before any).
        last_raw_rewards: ``(N,)`` their raw rewards; ``last_prompts``: their N prompts.
    """

    def __init__(
        self,
        num_envs: int = 1,
        reward_normalization: RewardNormalization = "per_prompt",
        stat_buffer_size: int = 32,
        stat_min_count: int = 4,
        adv_clip_max: float = 5.0,
        group_size: int = 1,
        seed: int = 0,
        **env_kwargs: Any,
    ) -> None:
        if reward_normalization not in ("per_prompt", "group", "batch", "none"):
            raise ValueError(
                f"reward_normalization must be per_prompt, group, batch or none, got {reward_normalization!r}"
            )
        if group_size < 1 or num_envs % group_size:
            raise ValueError(f"group_size={group_size} must divide num_envs={num_envs}")
        if reward_normalization == "group" and group_size < 2:
            raise ValueError("reward_normalization='group' needs group_size >= 2")
        # The adapter resets the episodes itself (to choose their prompts), so the vector env never autoresets.
        env_kwargs["autoreset_mode"] = "Disabled"
        self.venv = DenoisingVectorEnv(num_envs=num_envs, **env_kwargs)
        self.group_size = group_size
        self._prompt_rng = np.random.default_rng(seed)
        # The env's own (array-only) observation space: latent, timestep, prompt_id (flow models: float time, σ).
        observation_space = sb3_observation_space(self.venv.mdp)
        super().__init__(num_envs, observation_space, self.venv.single_action_space)
        self.reward_normalization = reward_normalization
        self.adv_clip_max = adv_clip_max
        from diffusion_mdp.normalization import PerPromptStatTracker

        self.stat_tracker = PerPromptStatTracker(stat_buffer_size, stat_min_count)
        self._actions: np.ndarray | None = None
        self._policy_checked = False
        self._episode_start = time.time()
        self.last_images: np.ndarray | None = None
        self.last_raw_rewards: np.ndarray | None = None
        self.last_prompts: list[str] = []

    @property
    def mdp(self) -> DenoisingMDP:
        return self.venv.mdp

    @property
    def prompts(self) -> list[str]:
        """The prompt set in ``prompt_id`` order."""
        return list(self.venv.mdp.prompts.prompts)

    def _convert(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        # SB3's buffers store NumPy arrays; prompt_id names the prompt.
        arrays = {
            "latent": np.asarray(obs["latent"], dtype=np.float32),
            "timestep": np.asarray(obs["timestep"], dtype=np.int64),
            "prompt_id": np.asarray(obs["prompt_id"], dtype=np.int64),
        }
        return convert_observation(self.venv.mdp.schedule, arrays)

    def _reset_episodes(self, seed: int | None = None) -> dict[str, Any]:
        options = None
        if self.group_size > 1:
            num_groups = self.num_envs // self.group_size
            num_prompts = len(self.venv.mdp.prompts)
            chosen = self._prompt_rng.choice(num_prompts, num_groups, replace=num_groups > num_prompts)
            options = {"prompt_ids": np.repeat(chosen, self.group_size)}
        obs, _ = self.venv.reset(seed=seed, options=options)
        return obs

    def reset(self) -> dict[str, np.ndarray]:
        # SB3 semantics: seeds set by ``seed()`` apply to this reset only.
        seed = self._seeds[0] if self._seeds and self._seeds[0] is not None else None
        if seed is not None:
            self._prompt_rng = np.random.default_rng(seed)
        obs = self._reset_episodes(seed)
        self._reset_seeds()
        self._reset_options()
        self._episode_start = time.time()
        return self._convert(obs)

    def step_async(self, actions: np.ndarray) -> None:
        if not self._policy_checked:
            self._policy_checked = True
            _refuse_stock_policy()
        self._actions = actions

    def normalize(self, rewards: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """The terminal reward SB3 trains on, ``(N,)``: normalised per prompt / batch, or raw."""
        return _normalize(self, self.reward_normalization, rewards, prompts)

    def step_wait(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[dict[str, Any]]]:
        assert self._actions is not None, "step_async() first"
        actions = np.asarray(self._actions, dtype=np.float32).reshape(self.num_envs, *self.venv.mdp.latent_shape)
        obs, rewards, terminated, truncated, info = self.venv.step(actions)
        dones = np.logical_or(terminated, truncated)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        rewards = np.asarray(rewards, dtype=np.float64)
        if dones.all():
            raw = rewards.copy()
            rewards = self.normalize(raw, info["prompt"])
            final = self._convert(obs)  # the terminal observation; SB3 expects the next episodes' first one
            obs = self._reset_episodes()
            length = self.venv.mdp.num_steps
            elapsed = time.time() - self._episode_start
            for i in range(self.num_envs):
                infos[i] = {
                    "terminal_observation": {key: value[i] for key, value in final.items()},
                    "episode": {"r": float(raw[i]), "l": length, "t": elapsed},  # what SB3 logs
                    "raw_reward": float(raw[i]),
                    "prompt": str(info["prompt"][i]),
                    "TimeLimit.truncated": False,
                }
            self.last_images, self.last_raw_rewards, self.last_prompts = info["image"], raw, list(info["prompt"])
            self._episode_start = time.time()
        return self._convert(obs), rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    # SB3's attribute plumbing: there is one underlying (batched) environment, so every index maps to it.
    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self.venv, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any) -> list[Any]:
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: Any = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


def _refuse_stock_policy() -> None:
    """Warn when an SB3 algorithm drives the adapter with a policy that never touches the UNet.

    A stock policy (``PPO("MultiInputPolicy", env)``) runs: it trains an MLP on flattened latents and
    leaves the diffusion model as it was, which is almost never what was meant. The algorithm is the
    caller a few frames up (``collect_rollouts`` -> ``VecEnv.step`` -> ``step_async``).
    """
    import inspect
    import warnings

    from stable_baselines3.common.base_class import BaseAlgorithm

    frame = inspect.currentframe()
    for _ in range(8):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return
        algorithm = frame.f_locals.get("self")
        if isinstance(algorithm, BaseAlgorithm):
            if not isinstance(algorithm.policy, DiffusionActorCriticPolicy):
                warnings.warn(
                    f"{type(algorithm).__name__} drives the denoising env with {type(algorithm.policy).__name__}, "
                    "which never updates the diffusion model (it trains an MLP on flattened latents). Use "
                    f"{type(algorithm).__name__}(DiffusionActorCriticPolicy, env, "
                    "policy_kwargs=diffusion_policy_kwargs(env), ...)",
                    UserWarning,
                    stacklevel=2,
                )
            return


def _adapter(env: VecEnv) -> DenoisingSB3VecEnv:
    """The :class:`DenoisingSB3VecEnv` inside SB3 wrappers."""
    inner: Any = env
    while not isinstance(inner, DenoisingSB3VecEnv):
        if not hasattr(inner, "venv"):
            raise TypeError(f"expected a DenoisingSB3VecEnv (or an SB3 wrapper of one), got {type(env).__name__}")
        inner = inner.venv
    return inner
