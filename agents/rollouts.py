"""Rollouts: fill the buffer with an epoch's trajectories of the current policy.

Each sample batch b of epoch e resets the vector env with seed ``(seed, "env", e, b)`` and samples the policy's
noise from ``(seed, "noise", e, b)`` (group advantages draw their prompts from ``(seed, "group", e, b)``), so an
epoch samples the same trajectories whether the run was resumed or not. With ``async_reward`` batch b is
scored in the background while b + 1 samples. A failing reward keeps the epoch's samples
(``failed_rewards/epoch<e>.pt``) and names the intact checkpoint. :class:`RolloutMixin` gives the agent
``collect_rollouts``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from diffusion_mdp.lora import merged_lora
from diffusion_mdp.mdp import RewardError
from diffusion_mdp.policy import DiffusionPolicy
from diffusion_mdp.prompts import PromptSet
from diffusion_mdp.rewards.executor import AsyncReward

from .buffer import DenoisingRolloutBuffer
from .checkpointing import atomic_torch_save
from .config import TrainConfig
from .distributed import Distributed, sync_rollout_buffer
from .seeding import SEED_TAGS, derived_seed

if TYPE_CHECKING:
    from diffusion_mdp.envs.vector import DenoisingVectorEnv


class RolloutMixin:
    """``collect_rollouts`` for :class:`DiffusionAgent`."""

    # What the agent provides (set in DiffusionAgent.__init__).
    config: TrainConfig
    run_dir: Path
    device: torch.device
    dist: Distributed
    env: DenoisingVectorEnv
    policy: DiffusionPolicy
    unet: Any
    buffer: DenoisingRolloutBuffer
    train_prompts: PromptSet
    reward_executor: AsyncReward | None
    last_images: tuple[np.ndarray, list[str], np.ndarray] | None

    if TYPE_CHECKING:

        def autocast(self) -> contextlib.AbstractContextManager[Any]: ...

        def _checkpoint_note(self) -> str: ...

    @torch.no_grad()
    def collect_rollouts(self, epoch: int) -> dict[str, Any]:
        """Fill the buffer with ``samples_per_epoch`` trajectories of the current policy (see ``_collect_rollouts``)."""
        with self._sampling_weights():
            return self._collect_rollouts(epoch)

    @contextlib.contextmanager
    def _sampling_weights(self) -> Iterator[None]:
        """With ``merge_lora_for_sampling``: the LoRA merged into its base weights, which are restored after."""
        if not (self.config.merge_lora_for_sampling and self.config.use_lora):
            yield
            return
        with merged_lora(self.unet):
            yield

    def _collect_rollouts(self, epoch: int) -> dict[str, Any]:
        """Fill the buffer with ``samples_per_epoch`` trajectories of the current policy; return reward stats.

        Raises:
            RewardError: The reward failed; the message names the reward, the batch, and the intact checkpoint.
        """
        cfg, buffer = self.config, self.buffer
        buffer.reset()
        num_batches = cfg.samples_per_epoch // cfg.sample_batch_size
        images, prompts = [], []
        pending = []  # async_reward: (batch, its reward future)
        for b in self.dist.local_batches(num_batches):  # all of them with one process
            options = None
            group_ids = np.arange(b * cfg.sample_batch_size, (b + 1) * cfg.sample_batch_size)
            if cfg.advantage_mode == "group":
                # k samples per prompt: N / k prompts drawn per batch, each repeated k times.
                rng = np.random.default_rng(derived_seed(cfg.seed, SEED_TAGS["group"], epoch, b))
                chosen = rng.integers(len(self.train_prompts), size=cfg.sample_batch_size // cfg.group_size)
                options = {"prompt_ids": np.repeat(chosen, cfg.group_size)}
                group_ids = b * cfg.sample_batch_size + np.repeat(np.arange(len(chosen)), cfg.group_size)
            seed = derived_seed(cfg.seed, SEED_TAGS["env"], epoch, b) % 2**31
            obs, info = self.env.reset(seed=seed, options=options)
            generator = torch.Generator(self.device).manual_seed(derived_seed(cfg.seed, SEED_TAGS["noise"], epoch, b))
            batch_prompts = list(info["prompt"])  # the observations hold prompt ids; the texts come in info
            obs["prompt"], obs["prompt_embeds"] = batch_prompts, self.policy.encode_prompts(batch_prompts)
            obs["group_id"] = group_ids
            terminated = np.zeros(cfg.sample_batch_size, dtype=bool)
            while not terminated.all():
                with self.autocast():
                    actions, log_probs = self.policy.sample(obs, generator=generator)
                try:
                    next_obs, rewards, terminated, _, info = self.env.step(actions)
                except RewardError as exc:
                    saved = self._save_unscored_samples(epoch, b, actions, list(obs["prompt"]))
                    raise RewardError(
                        f"epoch {epoch + 1}, sample batch {b + 1}/{num_batches}: {exc}. This epoch's samples so "
                        f"far are saved in {saved}; the last checkpoint ({self._checkpoint_note()}) is intact."
                    ) from exc
                buffer.add(obs, actions, rewards, log_prob=log_probs, block_start=b * cfg.sample_batch_size)
                next_obs["prompt"], next_obs["prompt_embeds"] = batch_prompts, obs["prompt_embeds"]
                next_obs["group_id"] = group_ids
                obs = next_obs
            images.append(info["image"])
            prompts.extend(info["prompt"])
            if self.reward_executor is not None:
                pending.append((b, self.reward_executor.submit(info["image"], batch_prompts, info["metadata"])))
        for b, future in pending:  # the terminal rewards, into the last step of each trajectory
            try:
                values, _ = future.result()
            except RewardError as exc:
                saved = self._save_unscored_samples(epoch, None, None, [])
                raise RewardError(
                    f"epoch {epoch + 1}, sample batch {b + 1}/{num_batches}: {exc}. This epoch's samples are "
                    f"saved in {saved}; the last checkpoint ({self._checkpoint_note()}) is intact."
                ) from exc
            block = slice(b * cfg.sample_batch_size, (b + 1) * cfg.sample_batch_size)
            buffer.rewards[block, -1] = torch.as_tensor(values, device=buffer.device, dtype=torch.float64)
        rewards = buffer.episode_rewards.cpu().numpy()
        if self.dist.enabled:  # every process gets the whole epoch: global rewards, prompts, advantages
            size = cfg.sample_batch_size
            rows = [r for b in self.dist.local_batches(num_batches) for r in range(b * size, (b + 1) * size)]
            sync_rollout_buffer(self.dist, buffer, rows)
            self.last_images = (np.concatenate(images), prompts, rewards[rows])  # this process's own samples
            rewards = buffer.episode_rewards.cpu().numpy()
        else:
            self.last_images = (np.concatenate(images), prompts, rewards)
        return {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "reward_min": float(rewards.min()),
            "reward_max": float(rewards.max()),
        }

    def _save_unscored_samples(
        self, epoch: int, failed_batch: int | None, failed_latents: Tensor | None, failed_prompts: list[str]
    ) -> Path:
        """Keep an epoch's samples when its reward fails, so that no sampling work is lost.

        Writes ``<run>/failed_rewards/epoch<e>.pt`` (atomically) with the x_0 latents ``(n, C, h, w)`` and
        prompts of every trajectory sampled so far (the buffer's complete batches, plus the batch whose
        reward failed): decode them with the VAE and score them once the reward works again.
        """
        cfg, buffer = self.config, self.buffer
        done = buffer.block_start  # trajectories of complete batches in the buffer
        latents = [buffer.final_latents[:done].cpu()]
        prompts = list(buffer.prompts[:done])
        if failed_latents is not None:
            latents.append(failed_latents.detach().float().cpu())
            prompts.extend(failed_prompts)
        path = self.run_dir / "failed_rewards" / f"epoch{epoch + 1}.pt"
        payload = {"latents": torch.cat(latents), "prompts": prompts, "epoch": epoch + 1, "batch": failed_batch}
        payload["reward"], payload["reward_kwargs"] = cfg.reward, cfg.reward_arguments
        atomic_torch_save(payload, path)
        return path
