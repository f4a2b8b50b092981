"""DDPO's terminal-reward normalisation, shared by the SB3 adapter and :class:`NormalizeTerminalReward`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

RewardNormalization = Literal["per_prompt", "group", "batch", "none"]


def _normalize(owner: Any, mode: RewardNormalization, rewards: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """DDPO's terminal-reward normalisation with ``owner``'s tracker, group size and clip, ``(N,)``."""
    if mode == "none":
        return rewards
    if mode == "per_prompt":
        normalised = owner.stat_tracker.update(list(prompts), rewards)
    elif mode == "group":
        from diffusion_mdp.normalization import group_statistics

        mean, std = group_statistics(np.arange(len(rewards)) // owner.group_size, rewards)
        normalised = (rewards - mean) / std
    else:
        normalised = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    return np.clip(normalised, -owner.adv_clip_max, owner.adv_clip_max)
