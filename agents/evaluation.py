"""Held-out evaluation: deterministic DDIM (η = 0) from fixed noise on the evaluation prompts.

:func:`evaluation_env` builds an η = 0 copy of the training env (same model, same reward and its validation);
:func:`run_deterministic` runs one batch of episodes through it from given noise and prompts, each action the
Gaussian's mean. :class:`EvaluationMixin` gives the agent ``evaluate`` and the evaluation done inside the
training loop (metrics, image grids ``images/eval_epoch<e>.png``, ``before.png`` / ``after.png``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.logger import Logger
from torch import Tensor

from diffusion_mdp.mdp import DenoisingMDP, RewardError
from diffusion_mdp.models import DiffusionComponents
from diffusion_mdp.policy import DiffusionPolicy
from diffusion_mdp.prompts import PromptSet

from .config import TrainConfig
from .seeding import SEED_TAGS, derived_seed
from .visual import save_grid

if TYPE_CHECKING:
    from diffusion_mdp.envs.vector import DenoisingVectorEnv

    from .distributed import Distributed


def evaluation_env(
    components: DiffusionComponents,
    prompts: PromptSet,
    num_envs: int,
    num_steps: int,
    reward: Any = None,
    device: torch.device | str = "cpu",
) -> DenoisingVectorEnv:
    """An η = 0 (deterministic DDIM) vector env for evaluation: torch observations, no autoreset.

    Args:
        components: The loaded model (shared, not copied).
        prompts: The prompt set whose ids :func:`run_deterministic` takes.
        num_envs: Episodes per batch.
        num_steps: T.
        reward: The reward (a loaded callable is shared); None defers it (the env returns images only).
        device: Where latents live.
    """
    env = gym.make_vec(
        "DenoisingMDP-v0",
        num_envs=num_envs,
        components=components,
        prompts=prompts,
        num_steps=num_steps,
        eta=0.0,
        reward=reward if reward is not None else "jpeg_compressibility",
        defer_reward=reward is None,
        device=str(device),
        torch_obs=True,
        autoreset_mode="Disabled",
    )
    return cast("DenoisingVectorEnv", env)  # make_vec builds the registered vector env itself (no wrappers)


@torch.no_grad()
def run_deterministic(
    env: DenoisingVectorEnv,
    policy: DiffusionPolicy,
    noise: Tensor,
    prompt_ids: Any,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """One batch of η = 0 episodes through ``env`` (an :func:`evaluation_env`) from fixed noise and prompts.

    Each action is the Gaussian's mean ``schedule.mean(ε̃, t, x_t)`` (σ_t = 0 at η = 0): deterministic DDIM.
    The env decodes x_0 and scores it with its reward (one validation, ``DenoisingMDP.score``).

    Args:
        env: The η = 0 vector env (``num_envs`` = B).
        policy: Its UNet and prompt encoder are used (its own schedule is not).
        noise: ``(B, C, h, w)`` x_T.
        prompt_ids: ``(B,)`` indices into the env's prompt set.
        autocast: Mixed-precision context for the UNet.

    Returns:
        ``(images uint8 (B, H, W, 3), rewards (B,) (zeros if the env defers its reward), x_0 (B, C, h, w))``.
    """
    schedule = env.unwrapped.schedule
    obs, info = env.reset(options={"noise": noise, "prompt_ids": prompt_ids})
    embeds = policy.encode_prompts(list(info["prompt"]))
    terminated = np.zeros(env.num_envs, dtype=bool)
    while not terminated.all():
        latents, timesteps = obs["latent"].to(policy.device), obs["timestep"].to(policy.device)
        # Flow models take the exact t = 1000 σ of the env's schedule (observations carry it rounded).
        with autocast():
            output = policy.predict(latents, schedule.model_time(timesteps), embeds)
        obs, rewards, terminated, _, info = env.step(schedule.mean(output.float(), timesteps, latents))
    return info["image"], np.asarray(rewards, dtype=np.float64), obs["latent"]


@torch.no_grad()
def sample_deterministic(
    policy: DiffusionPolicy,
    noise: Tensor,
    prompts: list[str],
    num_steps: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> Tensor:
    """Deterministic DDIM (η = 0) from ``noise`` ``(B, C, h, w)``; returns x_0 ``(B, C, h, w)``.

    A shorthand for :func:`run_deterministic` on an unscored :func:`evaluation_env` of ``prompts``.
    """
    unique = list(dict.fromkeys(prompts))
    env = evaluation_env(policy.components, PromptSet(unique), len(prompts), num_steps, device=noise.device)
    ids = [unique.index(p) for p in prompts]
    return run_deterministic(env, policy, noise, ids, autocast)[2]


class EvaluationMixin:
    """``evaluate`` and the evaluation inside the training loop, for :class:`DiffusionAgent`."""

    # What the agent provides (set in DiffusionAgent.__init__).
    config: TrainConfig
    run_dir: Path
    device: torch.device
    dist: Distributed
    components: DiffusionComponents
    mdp: DenoisingMDP
    policy: DiffusionPolicy
    eval_prompts: PromptSet
    eval_history: list[dict[str, Any]]
    logger: Logger | None
    _eval_envs: dict[tuple[int, int], DenoisingVectorEnv]

    if TYPE_CHECKING:

        def autocast(self) -> contextlib.AbstractContextManager[Any]: ...

        def _checkpoint_note(self) -> str: ...

    @torch.no_grad()
    def evaluate(self, num_samples: int | None = None) -> dict[str, Any]:
        """Render ``num_samples`` held-out images with η = 0 from fixed seeds and score them.

        The episodes run through an η = 0 copy of the training env (same model, same reward and its
        validation), with fixed noise and prompts given as reset options: see :func:`run_deterministic`.

        Returns:
            ``{"eval_reward_mean", "eval_reward_std", "images" (B, H, W, 3), "prompts", "rewards" (B,)}``.
        """
        cfg = self.config
        num_samples = num_samples or cfg.eval_num_samples
        rng = np.random.default_rng(derived_seed(cfg.seed, SEED_TAGS["eval"]))
        order = rng.permutation(len(self.eval_prompts))
        ids = np.resize(order, num_samples)  # every prompt once before any repeats
        generator = torch.Generator().manual_seed(derived_seed(cfg.seed, SEED_TAGS["eval"], 1))
        noise = torch.randn((num_samples, *self.components.latent_shape), generator=generator)
        images, rewards = [], []
        for start in range(0, num_samples, cfg.sample_batch_size):
            batch_ids = ids[start : start + cfg.sample_batch_size]
            env = self.evaluation_env(self.eval_prompts, len(batch_ids))
            try:
                batch_images, values, _ = run_deterministic(
                    env, self.policy, noise[start : start + len(batch_ids)], batch_ids, self.autocast
                )
            except RewardError as exc:
                raise RewardError(f"held-out evaluation: {exc}") from exc
            images.append(batch_images)
            rewards.append(values)
        all_rewards = np.concatenate(rewards)
        prompts = [self.eval_prompts.prompts[i] for i in ids]
        return {
            "eval_reward_mean": float(all_rewards.mean()),
            "eval_reward_std": float(all_rewards.std()),
            "images": np.concatenate(images),
            "prompts": prompts,
            "rewards": all_rewards,
        }

    def evaluation_env(self, prompts: PromptSet, num_envs: int, num_steps: int | None = None) -> DenoisingVectorEnv:
        """The η = 0 vector env of :meth:`evaluate` on ``prompts`` (cached): the training env's model and reward."""
        num_steps = num_steps or self.config.num_steps
        key = (num_envs, num_steps)
        cached = self._eval_envs.get(key)
        if cached is None or cached.unwrapped.mdp.prompts is not prompts:
            cached = evaluation_env(self.components, prompts, num_envs, num_steps, self.mdp.reward_fn, self.device)
            self._eval_envs[key] = cached
        return cached

    def _evaluate_in_loop(self, epoch: int) -> dict[str, Any]:
        """:meth:`_evaluate_and_log`, with any failure reported as a :class:`RewardError` naming the reward, the
        epoch and the checkpoint that holds the training so far (written just before)."""
        try:
            return self._evaluate_and_log(epoch)
        except Exception as exc:
            if epoch == 0:
                kept = "no epoch was trained yet, so nothing is lost; fix the reward and start the run again"
            else:
                kept = (
                    f"training up to epoch {epoch} is saved in {self._checkpoint_note()}; fix the reward and "
                    "continue with --resume (the evaluation is redone first)"
                )
            detail = str(exc) if isinstance(exc, RewardError) else f"{type(exc).__name__}: {exc}"
            raise RewardError(
                f"evaluation after epoch {epoch} failed (reward {self.mdp.reward_name!r}): {detail}. {kept}."
            ) from exc

    def _evaluate_and_log(self, epoch: int) -> dict[str, Any]:
        result = self.evaluate()
        entry = {
            "epoch": epoch,
            "eval_reward_mean": result["eval_reward_mean"],
            "eval_reward_std": result["eval_reward_std"],
        }
        self.eval_history.append(entry)
        if not self.dist.is_main:  # FSDP: the other processes took part in the forward passes only
            return entry
        images_dir = self.run_dir / "images"
        captions = [f"{p} | r={r:.3g}" for p, r in zip(result["prompts"], result["rewards"], strict=True)]
        title = f"held-out eval (η=0), epoch {epoch}: mean reward {result['eval_reward_mean']:.4g}"
        path = save_grid(result["images"], captions, images_dir / f"eval_epoch{epoch:04d}.png", title=title)
        if epoch == 0:
            (images_dir / "before.png").write_bytes(path.read_bytes())
        else:
            (images_dir / "after.png").write_bytes(path.read_bytes())
        if self.logger is not None:
            self.logger.record("eval/reward_mean", entry["eval_reward_mean"])
            self.logger.record("eval/reward_std", entry["eval_reward_std"])
            if epoch == 0:
                self.logger.dump(step=0)
        print(f"[eval] epoch {epoch}: held-out reward {entry['eval_reward_mean']:.4f} ± {entry['eval_reward_std']:.4f}")
        return entry
