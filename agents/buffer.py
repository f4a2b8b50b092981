"""The rollout buffer of the denoising MDP: T + 1 latents per trajectory, torch storage on the training device.

A trajectory's states and actions share latents (the action a_t = x_{t-1} *is* the next state's latent), so
the T+1 latents x_T, ..., x_0 are stored once: ``latents[i, k]`` is the latent after k steps, the state of
step k is ``latents[i, k]`` and its action ``latents[i, k + 1]`` (ddpo-pytorch's ``latents[:, :-1]`` /
``latents[:, 1:]``). The trajectories are filled one sample batch (the vector env's N episodes, which all
last exactly T steps) at a time: ``add`` records one step of the current block of N trajectories and, after
T steps, moves on to the next block.

Shapes (n = trajectories per epoch, T = steps, C/h/w latent, L/D prompt embedding):

- ``latents`` ``(n, T + 1, C, h, w)``, ``timesteps`` ``(n, T)``, ``log_probs`` ``(n, T)`` (old π),
- ``rewards`` ``(n, T)`` (0 except the last step), ``returns``/``advantages`` ``(n, T)``,
- ``prompt_ids`` ``(n,)``, ``prompt_embeds`` ``(n, L, D)``, ``group_ids`` ``(n,)``.

**Relation to Stable-Baselines3.** The methods follow SB3's ``RolloutBuffer`` (``reset``, ``add``,
``compute_returns_and_advantage``, ``get``) so that a reader of SB3 finds the same steps, and a step batch is
a typed NamedTuple like SB3's ``RolloutBufferSamples``. It is *not* an SB3 ``RolloutBuffer`` and does not
subclass one: SB3 stores ``(buffer_size, n_envs)`` NumPy arrays of flattened observations with a critic's
values and yields single (s, a) pairs, while this buffer is trajectory-major ``(n, T)`` torch storage without
a critic and yields minibatches of trajectories, each with its own order of timesteps; none of SB3's buffer
code runs here and it could not stand in for SB3's in an SB3 algorithm. (Stock SB3 PPO, with SB3's own
buffer, runs on the same MDP through ``diffusion_mdp.envs.sb3``.) What the agents reuse from SB3 is its
schedules (``FloatSchedule``, ``LinearSchedule``) and its logger (``configure``, ``Logger``).

>>> buffer = DenoisingRolloutBuffer(num_steps=2, num_trajectories=2, latent_shape=(1, 1, 1), embed_shape=(1, 1))
>>> obs = {"latent": torch.zeros(2, 1, 1, 1), "prompt_id": torch.arange(2), "prompt": ["a", "b"],
...        "prompt_embeds": torch.zeros(2, 1, 1)}
>>> for k in range(2):  # two steps; the reward comes at the last one
...     obs["timestep"] = torch.full((2,), 500 - 500 * k)
...     buffer.add(obs, torch.ones(2, 1, 1, 1), [0.0, 0.0] if k == 0 else [1.0, 3.0], log_prob=torch.zeros(2))
>>> batch_stats = lambda returns, prompts, groups: (np.full_like(returns, 2.0), np.full_like(returns, 1.0))
>>> buffer.compute_returns_and_advantage(batch_stats)  # (μ, σ) = (2, 1), the batch's
>>> buffer.advantages.tolist()  # γ = 1: every step's advantage is the normalised terminal reward
[[-1.0, -1.0], [1.0, 1.0]]
>>> minibatch = next(buffer.get(batch_size=2, generator=torch.Generator().manual_seed(0)))
>>> step = minibatch.step(0)  # the first of each trajectory's shuffled steps
>>> step.latents.shape, step.advantages.shape
(torch.Size([2, 1, 1, 1]), torch.Size([2]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

# (returns (n,), prompts, group_ids (n,)) -> (μ (n,), σ (n,)): see advantages.AdvantageNormalizer.
AdvantageFn = Callable[[np.ndarray, Sequence[str], np.ndarray], tuple[np.ndarray, np.ndarray]]


class StepBatch(NamedTuple):
    """One training step's data for a minibatch of b trajectories (each at its own timestep).

    The samples the update loop trains on, as SB3's ``RolloutBufferSamples`` (a NamedTuple of tensors).

    Attributes:
        latents: ``(b, C, h, w)`` x_t.
        next_latents: ``(b, C, h, w)`` the action taken, x_{t-1}.
        timesteps: ``(b,)`` t.
        old_log_probs: ``(b,)`` log π_old(x_{t-1} | x_t, c) recorded at sampling time.
        advantages: ``(b,)`` A(s_t, a_t).
        prompt_embeds: ``(b, L, D)``.
        indices: ``(b,)`` which trajectories; ``step_indices``: ``(b,)`` which step k of each.
    """

    latents: Tensor
    next_latents: Tensor
    timesteps: Tensor
    old_log_probs: Tensor
    advantages: Tensor
    prompt_embeds: Tensor
    indices: Tensor
    step_indices: Tensor

    def obs(self) -> dict[str, Tensor]:
        """The observation dict the policy reads."""
        return {"latent": self.latents, "timestep": self.timesteps, "prompt_embeds": self.prompt_embeds}


@dataclass(frozen=True)
class TrajectoryMinibatch:
    """b trajectories and, for each, its own random order of the steps to train on.

    Attributes:
        indices: ``(b,)`` trajectory indices.
        step_order: ``(b, K)`` step indices k per trajectory (K = timestep_fraction * T).
    """

    buffer: DenoisingRolloutBuffer
    indices: Tensor
    step_order: Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.step_order.shape[1])

    def step(self, j: int) -> StepBatch:
        """The j-th training step of every trajectory in the minibatch (different t per trajectory)."""
        return self.steps(j, j + 1)

    def steps(self, start: int, stop: int) -> StepBatch:
        """Training steps ``start .. stop - 1`` of every trajectory, stacked into one batch of ``b·(stop - start)``.

        Rows are ordered step-major (the b trajectories' ``start``-th steps, then their next ones, …), so
        ``steps(j, j + 1)`` is :meth:`step` ``(j)``; a loss that is a mean over rows is then the mean of the
        per-step losses, and one forward of the stacked batch does the work of ``stop - start`` forwards.
        """
        buf, idx = self.buffer, self.indices
        k = self.step_order[:, start:stop].T.reshape(-1)  # (b·c,): step-major
        rows = idx.repeat(stop - start)
        return StepBatch(
            latents=buf.latents[rows, k],
            next_latents=buf.latents[rows, k + 1],
            timesteps=buf.timesteps[rows, k],
            old_log_probs=buf.log_probs[rows, k],
            advantages=buf.advantages[rows, k],
            prompt_embeds=buf.prompt_embeds[rows],
            indices=rows,
            step_indices=k,
        )


class DenoisingRolloutBuffer:
    """The epoch's trajectories: T + 1 latents each, log-probs, rewards, advantages (see the module docstring).

    Args:
        num_steps: T.
        num_trajectories: n, trajectories per epoch.
        latent_shape: ``(C, h, w)``.
        embed_shape: ``(L, D)`` of a prompt embedding.
        device: Storage device (the training device).
        gamma: Discount γ (1 in DDPO).
    """

    def __init__(
        self,
        num_steps: int,
        num_trajectories: int,
        latent_shape: tuple[int, int, int],
        embed_shape: tuple[int, int],
        device: torch.device | str = "cpu",
        gamma: float = 1.0,
    ) -> None:
        self.num_steps = int(num_steps)
        self.num_trajectories = int(num_trajectories)
        self.latent_shape = tuple(latent_shape)
        self.embed_shape = tuple(embed_shape)
        self.device = torch.device(device)
        self.gamma = float(gamma)
        # Multi-process training: indices (b,) of a global minibatch -> this process's share (see
        # agents/distributed.py); None trains on whole minibatches.
        self.shard: Callable[[Tensor], Tensor] | None = None
        self.reset()

    def reset(self) -> None:
        """Allocate (or clear) the torch storage."""
        n, steps, dev = self.num_trajectories, self.num_steps, self.device
        self.latents = torch.zeros((n, steps + 1, *self.latent_shape), device=dev)
        self.timesteps = torch.zeros((n, steps), dtype=torch.int64, device=dev)
        self.log_probs = torch.zeros((n, steps), device=dev)
        self.rewards = torch.zeros((n, steps), dtype=torch.float64, device=dev)
        self.returns = torch.zeros((n, steps), dtype=torch.float64, device=dev)
        self.advantages = torch.zeros((n, steps), device=dev)
        self.prompt_embeds = torch.zeros((n, *self.embed_shape), device=dev)
        self.prompt_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.group_ids = np.zeros(n, dtype=np.int64)
        self.prompts: list[str] = [""] * n
        self.block_start = 0  # first trajectory of the sample batch being filled
        self.pos = 0  # the step k of that block which add() records next
        self.full = False
        self.advantages_ready = False

    def add(
        self,
        obs: dict[str, Any],
        action: Tensor,
        reward: np.ndarray | Tensor | Sequence[float],
        *,
        log_prob: Tensor,
        block_start: int | None = None,
    ) -> None:
        """Record step ``pos`` of the current block of N trajectories.

        Args:
            obs: The batched observation at this step: ``latent`` ``(N, C, h, w)``, ``timestep`` ``(N,)``,
                ``prompt`` (N str), ``prompt_id`` ``(N,)``, ``prompt_embeds`` ``(N, L, D)``, optionally
                ``group_id`` ``(N,)``.
            action: ``(N, C, h, w)`` x_{t-1}.
            reward: ``(N,)`` the step's reward (0 until the last step).
            log_prob: ``(N,)`` log π_old(action | obs).
            block_start: First trajectory row of this block (default: right after the previous block); read at
                a block's first step only.
        """
        if self.full:
            raise RuntimeError("the buffer is full: call reset() before adding more steps")
        if self.pos == 0 and block_start is not None:  # multi-process: batches fill non-consecutive blocks
            self.block_start = int(block_start)
        num = int(action.shape[0])
        rows = slice(self.block_start, self.block_start + num)
        if rows.stop > self.num_trajectories:
            raise ValueError(f"adding {num} trajectories overflows the buffer's {self.num_trajectories}")
        if self.pos == 0:  # a new block of episodes: its prompts and x_T
            self.latents[rows, 0] = torch.as_tensor(obs["latent"], device=self.device, dtype=torch.float32)
            self.prompt_ids[rows] = torch.as_tensor(obs["prompt_id"], device=self.device)
            self.prompt_embeds[rows] = obs["prompt_embeds"].to(self.device, torch.float32)
            self.prompts[rows] = list(obs["prompt"])
            self.group_ids[rows] = np.asarray(obs.get("group_id", np.arange(rows.start, rows.stop)))
        self.latents[rows, self.pos + 1] = action.to(self.device, torch.float32)
        self.timesteps[rows, self.pos] = torch.as_tensor(obs["timestep"], device=self.device)
        self.log_probs[rows, self.pos] = log_prob.to(self.device, torch.float32)
        self.rewards[rows, self.pos] = torch.as_tensor(reward, device=self.device, dtype=torch.float64)
        self.pos += 1
        if self.pos == self.num_steps:
            self.pos = 0
            self.block_start += num
            self.full = self.block_start == self.num_trajectories

    @property
    def final_latents(self) -> Tensor:
        """``(n, C, h, w)`` x_0 of every trajectory."""
        return self.latents[:, -1]

    @property
    def episode_rewards(self) -> Tensor:
        """``(n,)`` float64 undiscounted episode rewards (the terminal reward r(x_0, c))."""
        return self.rewards.sum(dim=1)

    def compute_returns_and_advantage(self, advantage_fn: AdvantageFn, adv_clip_max: float = float("inf")) -> None:
        """Returns G_t and advantages A_t for every step (no critic: a reward baseline instead of GAE).

        G_t = Σ_{k≥t} γ^{k-t} r_k, the discounted return (what SB3's GAE returns with V ≡ 0 and λ = 1).
        Each trajectory's (μ, σ) come from ``advantage_fn`` applied to G at the first step, and
        A_t = clip((G_t - μ) / σ, ± adv_clip_max). With γ = 1, G_t = r(x_0, c) for every t, so every step's
        advantage is the trajectory's normalised terminal reward.

        Args:
            advantage_fn: ``(returns (n,), prompts, group_ids (n,)) -> (μ (n,), σ (n,))``.
            adv_clip_max: Clip advantages to ± this.
        """
        if not self.full:
            raise RuntimeError(
                f"the buffer holds {self.block_start}/{self.num_trajectories} trajectories; fill it first"
            )
        running = torch.zeros(self.num_trajectories, dtype=torch.float64, device=self.device)
        for t in reversed(range(self.num_steps)):
            running = self.rewards[:, t] + self.gamma * running
            self.returns[:, t] = running
        mean, std = advantage_fn(self.returns[:, 0].cpu().numpy(), self.prompts, self.group_ids)
        mean_t = torch.as_tensor(mean, device=self.device, dtype=torch.float64)[:, None]
        std_t = torch.as_tensor(std, device=self.device, dtype=torch.float64)[:, None]
        self.advantages = ((self.returns - mean_t) / std_t).clamp(-adv_clip_max, adv_clip_max).float()
        self.advantages_ready = True

    def get(
        self,
        batch_size: int | None = None,
        timestep_fraction: float = 1.0,
        generator: torch.Generator | None = None,
        step_range: tuple[int, int] | None = None,
    ) -> Iterator[TrajectoryMinibatch]:
        """Shuffled minibatches of trajectories, each with its own random order of timesteps.

        Shuffling happens across samples (a permutation of the trajectories) and across time (an
        independent permutation of the T steps per trajectory, of which the first
        ``ceil(timestep_fraction * T)`` are kept), as in the authors' implementation.

        Args:
            batch_size: Trajectories per minibatch (all by default).
            timestep_fraction: Fraction of steps trained on.
            generator: CPU RNG for the permutations (for reproducibility).
            step_range: ``(start, stop)``: train only on steps k in ``start .. stop - 1`` (e.g. Flow-GRPO's SDE
                window), ``timestep_fraction`` of them; None: all T steps.
        """
        if not self.advantages_ready:
            raise RuntimeError("call compute_returns_and_advantage() before get()")
        n = self.num_trajectories
        first, stop = (0, self.num_steps) if step_range is None else step_range
        if not 0 <= first < stop <= self.num_steps:
            raise ValueError(f"step_range {step_range} must lie within 0..{self.num_steps} and hold at least one step")
        steps = stop - first
        batch_size = batch_size or n
        num_train_steps = max(1, int(np.ceil(timestep_fraction * steps)))
        perm = torch.randperm(n, generator=generator)
        step_order = first + torch.argsort(torch.rand((n, steps), generator=generator), dim=1)[:, :num_train_steps]
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if self.shard is not None:  # multi-process: this process's chunk of the global minibatch
                idx = self.shard(idx)
            yield TrajectoryMinibatch(self, idx.to(self.device), step_order[idx].to(self.device))


__all__ = ["AdvantageFn", "DenoisingRolloutBuffer", "StepBatch", "TrajectoryMinibatch"]
