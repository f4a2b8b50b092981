"""Scoring rewards in the background, so that a slow reward (a VLM, a remote server) overlaps sampling.

:class:`AsyncReward` wraps any reward in a :class:`~concurrent.futures.ThreadPoolExecutor`:
``submit(images, prompts, metadata)`` returns a :class:`~concurrent.futures.Future` of ``(rewards, info)``
at once. Torch releases the GIL inside its kernels and HTTP waits release it too, so the reward of batch b
runs while the policy samples batch b + 1:

>>> import numpy as np
>>> from diffusion_mdp.rewards import make_reward
>>> scorer = AsyncReward(make_reward("jpeg_compressibility"))
>>> future = scorer.submit(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"], [{}, {}])
>>> rewards, info = future.result()  # ... sample the next batch before asking
>>> rewards.shape
(2,)
>>> scorer.shutdown()

The agent's hook: ``DenoisingMDP(..., reward=AsyncReward(fn))`` is still a plain synchronous reward (calling
it waits), so nothing changes; code that wants overlap calls ``submit`` on the decoded images of a finished
batch and collects the futures before computing advantages (see ``docs/real_scale.md``).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from diffusion_mdp.rewards import RewardFn


class AsyncReward:
    """A reward evaluated in a background thread pool.

    Args:
        reward_fn: Any reward ``(images, prompts, metadata) -> (rewards, info)``.
        max_workers: Concurrent reward calls (1 keeps one model busy in order; more suits remote servers).
    """

    def __init__(self, reward_fn: RewardFn, max_workers: int = 1) -> None:
        self.reward_fn = reward_fn
        self.executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward")
        self.__name__ = getattr(reward_fn, "__name__", type(reward_fn).__name__)

    def submit(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> Future[tuple[np.ndarray, dict[str, Any]]]:
        """Start scoring a batch; the inputs are copied, so the caller may reuse its buffers at once."""
        images = np.array(images, copy=True)
        return self.executor.submit(self.reward_fn, images, list(prompts), [dict(m) for m in metadata])

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Synchronous scoring (submit and wait): a drop-in reward."""
        return self.submit(images, prompts, metadata).result()

    def shutdown(self, wait: bool = True) -> None:
        self.executor.shutdown(wait=wait)

    def __enter__(self) -> AsyncReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


__all__ = ["AsyncReward"]
