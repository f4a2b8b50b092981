"""Stock Stable-Baselines3 PPO fine-tunes a diffusion model on the denoising MDP.

Nothing of PPO is re-implemented: ``stable_baselines3.PPO`` collects rollouts, computes GAE and runs its
clipped-surrogate update. Two adapters from :mod:`diffusion_mdp.envs.sb3` make it possible:

- ``DenoisingSB3VecEnv``: the natively batched vector env as an SB3 ``VecEnv`` (drops the ``prompt`` text,
  keeps ``prompt_id``; hands SB3 the per-prompt normalised terminal reward, DDPO's advantage);
- ``DiffusionActorCriticPolicy``: an ``ActorCriticPolicy`` whose action distribution is the DDIM step's
  Gaussian, with DDPO's mean-over-dimensions log-prob.

With ``ddpo_ppo_kwargs`` (γ = λ = 1, no per-minibatch advantage normalisation, ``vf_coef=0``, clip 1e-4)
SB3's loss is DDPO-IS's loss; docs/plug_in.md lists where the two still differ.

    python examples/sb3_ppo.py                      # tiny-shapes, JPEG compressibility, held-out eval (~15 min)
    python examples/sb3_ppo.py --smoke --model <pipeline folder> --reward jpeg_compressibility
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

import diffusion_mdp  # noqa: F401  (registers DenoisingMDP-v0)
from diffusion_mdp.envs.sb3 import (
    DenoisingSB3VecEnv,
    DiffusionActorCriticPolicy,
    ddpo_ppo_kwargs,
    diffusion_policy_kwargs,
)
from diffusion_mdp.policy import DiffusionPolicy
from diffusion_mdp.prompts import load_prompts
from diffusion_mdp.viz import image_grid


@torch.no_grad()
def evaluate(
    policy: DiffusionPolicy, env: gym.vector.VectorEnv, num_batches: int, seed: int
) -> tuple[np.ndarray, list]:
    """Fixed env seeds and a fixed policy generator (the same noise before and after training).

    Every prompt of the env's set is used equally often. Returns ``(num_batches * N,)`` rewards and the first
    batch's images.
    """
    rewards, images = [], []
    for b in range(num_batches):
        obs, _ = env.reset(seed=seed + 1000 * b, options={"prompt_ids": np.arange(env.num_envs)})
        generator = torch.Generator().manual_seed(seed + b)
        terminated = np.zeros(env.num_envs, dtype=bool)
        while not terminated.all():
            actions, _ = policy.sample(obs, generator=generator)
            obs, reward, terminated, _, info = env.step(actions)
        rewards.append(reward)
        images.append(info["image"])
    return np.concatenate(rewards), list(images[0])


class RewardPrinter(BaseCallback):
    """Print the raw reward of every rollout's episodes (SB3 trains on the normalised one)."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[float] = []
        self.t0 = time.perf_counter()

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        env: DenoisingSB3VecEnv = self.training_env  # type: ignore[assignment]
        if env.last_raw_rewards is not None:
            self.history.append(float(env.last_raw_rewards.mean()))
            print(
                f"rollout {len(self.history):3d}  reward {self.history[-1]:.4f}  {time.perf_counter() - self.t0:.0f}s"
            )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: bundled tiny-shapes)")
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--prompts", default="shapes_train")
    parser.add_argument("--eval-prompts", default="shapes_heldout")
    parser.add_argument("--rollouts", type=int, default=40, help="PPO iterations (one batch of N episodes each)")
    # Big rollouts, few optimiser steps: see docs/agents.md, "Tuning on tiny-shapes".
    parser.add_argument("--batch", type=int, default=64, help="N episodes per rollout (the VecEnv's num_envs)")
    parser.add_argument("--steps", type=int, default=10, help="T denoising steps")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--clip-range", type=float, default=1e-4)
    # 2 optimiser steps per rollout: the 2nd is off-policy, where PPO's ratio and clip come in.
    parser.add_argument("--minibatches", type=int, default=2, help="SB3 minibatches per rollout")
    parser.add_argument("--group", type=int, default=4, help="k episodes per prompt in each rollout (1: no groups)")
    parser.add_argument("--normalization", default="per_prompt", choices=["per_prompt", "group", "batch", "none"])
    parser.add_argument("--lora-rank", type=int, default=0, help="0: fine-tune the whole UNet; r > 0: a LoRA")
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/sb3_ppo")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: tiny batch, 2 steps, 1 rollout")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rollouts, args.batch, args.group, args.steps, args.eval_batches, args.minibatches = 1, 2, 2, 2, 1, 1
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    env = DenoisingSB3VecEnv(
        num_envs=args.batch,
        model=args.model,
        reward=args.reward,
        prompts=args.prompts,
        num_steps=args.steps,
        group_size=args.group,
        reward_normalization=args.normalization,
        seed=args.seed,
    )
    eval_prompts = load_prompts(args.eval_prompts)
    n_eval = 2 if args.smoke else len(eval_prompts)
    eval_env = gym.make_vec(
        "DenoisingMDP-v0",
        num_envs=n_eval,
        reward=args.reward,
        prompts=eval_prompts,
        num_steps=args.steps,
        components=env.venv.components,
        autoreset_mode="Disabled",
    )
    # In-distribution too: every training prompt once, fixed seeds.
    train_eval_env = gym.make_vec(
        "DenoisingMDP-v0",
        num_envs=2 if args.smoke else len(load_prompts(args.prompts)),
        reward=args.reward,
        prompts=args.prompts,
        num_steps=args.steps,
        components=env.venv.components,
        autoreset_mode="Disabled",
    )

    torch.manual_seed(args.seed)  # the LoRA initialisation draws from the global RNG
    model = PPO(
        DiffusionActorCriticPolicy,
        env,
        **ddpo_ppo_kwargs(
            env,
            batch_size=args.batch * args.steps // args.minibatches,
            learning_rate=args.lr,
            clip_range=args.clip_range,
            seed=args.seed,
        ),
        policy_kwargs=diffusion_policy_kwargs(env, guidance_scale=args.guidance, lora_rank=args.lora_rank or None),
        verbose=0,
    )
    diffusion: DiffusionPolicy = model.policy.diffusion  # the actor, to evaluate outside SB3

    before, images_before = evaluate(diffusion, eval_env, args.eval_batches, seed=12345)
    train_before, _ = evaluate(diffusion, train_eval_env, 1, seed=54321)
    print(f"training-prompt reward before: {train_before.mean():.4f}")
    print(f"held-out reward before: {before.mean():.4f} ± {before.std():.4f}")
    printer = RewardPrinter()
    model.learn(total_timesteps=args.rollouts * args.batch * args.steps, callback=printer)
    after, images_after = evaluate(diffusion, eval_env, args.eval_batches, seed=12345)
    train_after, _ = evaluate(diffusion, train_eval_env, 1, seed=54321)
    print(f"training-prompt reward after: {train_after.mean():.4f}   (before {train_before.mean():.4f})")
    print(f"held-out reward after:  {after.mean():.4f} ± {after.std():.4f}   (before {before.mean():.4f})")
    logged = {k: v for k, v in model.logger.name_to_value.items() if k.startswith("train/")}
    print("last SB3 train/ metrics:", {k: round(float(v), 6) for k, v in logged.items()})

    result = {
        "eval_before": float(before.mean()),
        "eval_after": float(after.mean()),
        "eval_before_std": float(before.std()),
        "eval_after_std": float(after.std()),
        "eval_samples": len(after),
        "train_prompts_before": float(train_before.mean()),
        "train_prompts_after": float(train_after.mean()),
        "train_reward": printer.history,
        "sb3_train_metrics": {k: float(v) for k, v in logged.items()},
        "args": vars(args),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    prompts = [eval_prompts.prompts[i] for i in range(n_eval)]
    captions = [f"before: {p}" for p in prompts] + [f"after: {p}" for p in prompts]
    image_grid(images_before + images_after, captions, columns=n_eval, scale=3).save(out / "before_after.png")
    return result


if __name__ == "__main__":
    main()
