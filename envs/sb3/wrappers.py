"""SB3 wrappers around the adapter: DDPO's normalisation outside ``VecMonitor``, and the builder of both."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecMonitor

from .normalization import RewardNormalization, _normalize
from .vec_env import DenoisingSB3VecEnv, _adapter


class NormalizeTerminalReward(VecEnvWrapper):
    """DDPO's terminal-reward normalisation as an SB3 wrapper, to sit *outside* ``VecMonitor``.

    ``VecMonitor`` records the rewards it sees as ``info["episode"]["r"]`` (SB3's ``ep_rew_mean``); under
    this wrapper those are the raw rewards, while the algorithm trains on the normalised ones.

    Args:
        venv: A (possibly monitored) :class:`DenoisingSB3VecEnv` built with ``reward_normalization="none"``.
        reward_normalization: ``"per_prompt"``, ``"group"`` or ``"batch"`` (see :class:`DenoisingSB3VecEnv`).
        stat_buffer_size, stat_min_count, adv_clip_max: As for :class:`DenoisingSB3VecEnv`.
    """

    def __init__(
        self,
        venv: VecEnv,
        reward_normalization: RewardNormalization = "per_prompt",
        stat_buffer_size: int = 32,
        stat_min_count: int = 4,
        adv_clip_max: float = 5.0,
    ) -> None:
        from diffusion_mdp.normalization import PerPromptStatTracker

        super().__init__(venv)
        inner = _adapter(venv).reward_normalization
        if inner != "none":
            raise ValueError(
                f"the wrapped adapter already normalises its rewards ({inner!r}): build it with "
                "reward_normalization='none' and normalise here only"
            )
        self.reward_normalization = reward_normalization
        self.group_size = _adapter(venv).group_size
        if reward_normalization == "group" and self.group_size < 2:
            raise ValueError("reward_normalization='group' needs the adapter's group_size >= 2")
        self.stat_tracker = PerPromptStatTracker(stat_buffer_size, stat_min_count)
        self.adv_clip_max = adv_clip_max

    def reset(self) -> Any:
        return self.venv.reset()

    def step_wait(self) -> Any:
        obs, rewards, dones, infos = self.venv.step_wait()
        if dones.all():
            prompts = [info["prompt"] for info in infos]
            rewards = _normalize(self, self.reward_normalization, np.asarray(rewards, np.float64), prompts)
        return obs, np.asarray(rewards, dtype=np.float32), dones, infos


def make_sb3_env(
    num_envs: int,
    model: str | os.PathLike[str] | None = None,
    monitor: bool = False,
    **kwargs: Any,
) -> VecEnv:
    """``DenoisingSB3VecEnv(num_envs, model=model, **kwargs)``; with ``monitor=True``, monitored raw rewards.

    ``monitor=True`` builds ``NormalizeTerminalReward(VecMonitor(DenoisingSB3VecEnv(..., reward_normalization=
    "none")), reward_normalization)``: ``VecMonitor`` reports the raw rewards, the algorithm trains on the
    normalised ones (the adapter's ``reward_normalization``, ``stat_buffer_size``, ``stat_min_count`` and
    ``adv_clip_max`` go to the outer wrapper).
    """
    if not monitor:
        return DenoisingSB3VecEnv(num_envs=num_envs, model=model, **kwargs)
    normalization = {
        key: kwargs.pop(key)
        for key in ("reward_normalization", "stat_buffer_size", "stat_min_count", "adv_clip_max")
        if key in kwargs
    }
    mode = normalization.pop("reward_normalization", "per_prompt")
    monitored = VecMonitor(DenoisingSB3VecEnv(num_envs=num_envs, model=model, reward_normalization="none", **kwargs))
    return monitored if mode == "none" else NormalizeTerminalReward(monitored, mode, **normalization)
