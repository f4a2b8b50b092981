"""Reward statistics for advantage normalisation: per prompt (with history), per batch, per group.

The generic part of ``agents/advantages.py`` (which re-exports it), in the core so that the SB3 adapter
(``diffusion_mdp.envs.sb3``) normalises rewards the same way without importing an agent module.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

STD_EPS = 1e-6  # keeps a prompt whose rewards are all equal from dividing by zero (as the authors' code)


class PerPromptStatTracker:
    """Running reward statistics per prompt (the authors' ``PerPromptStatTracker``), with a saveable state.

    Args:
        buffer_size: How many recent rewards to keep per prompt.
        min_count: Below this many rewards for a prompt, fall back to the batch's statistics.

    >>> tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    >>> tracker.update(["a", "a", "b"], np.array([1.0, 3.0, 5.0])).round(3).tolist()
    [-1.0, 1.0, 1.225]
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[str, deque[float]] = {}

    def statistics(self, prompts: Sequence[str], rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Record ``rewards`` and return each sample's (μ, σ), both ``(B,)``.

        Args:
            prompts: ``B`` prompt strings.
            rewards: ``(B,)`` terminal rewards.
        """
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards")
        mean = np.empty_like(rewards)
        std = np.empty_like(rewards)
        prompts_arr = np.asarray(prompts, dtype=object)
        batch_mean, batch_std = rewards.mean(), rewards.std() + STD_EPS
        for prompt in dict.fromkeys(prompts):
            mask = prompts_arr == prompt
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean[mask], std[mask] = batch_mean, batch_std
            else:
                mean[mask], std[mask] = np.mean(buffer), np.std(buffer) + STD_EPS
        return mean, std

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        """Record ``rewards`` and return their normalised values ``(B,)``."""
        mean, std = self.statistics(prompts, rewards)
        return (np.asarray(rewards, dtype=np.float64) - mean) / std

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {prompt: list(values) for prompt, values in self.stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state["stats"].items()}


def batch_statistics(rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every sample's (μ, σ) is the batch's: ``(B,)`` each.

    >>> mean, std = batch_statistics(np.array([1.0, 3.0]))
    >>> mean.tolist(), std.round(6).tolist()  # σ + 1e-6 keeps equal rewards from dividing by zero
    ([2.0, 2.0], [1.000001, 1.000001])
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    return np.full_like(rewards, rewards.mean()), np.full_like(rewards, rewards.std() + STD_EPS)


def group_statistics(group_ids: np.ndarray, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, σ) of each sample's group (samples sharing a group id, e.g. the k samples of one prompt in a batch).

    >>> mean, _ = group_statistics(np.array([0, 0, 1, 1]), np.array([1.0, 3.0, 10.0, 20.0]))
    >>> mean.tolist()
    [2.0, 2.0, 15.0, 15.0]
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    mean, std = np.empty_like(rewards), np.empty_like(rewards)
    for gid in np.unique(group_ids):
        mask = group_ids == gid
        mean[mask], std[mask] = rewards[mask].mean(), rewards[mask].std() + STD_EPS
    return mean, std
