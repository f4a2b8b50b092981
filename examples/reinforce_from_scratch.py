"""REINFORCE on the denoising MDP, from scratch, in one file (DDPO-SF without the library's agent).

The whole algorithm, using only the Gymnasium env and the policy's ``log_prob``:

    repeat:
        sample N episodes (k of each of N/k prompts) s_0, a_0, ..., s_{T-1}, a_{T-1}; the env scores x_0: r
        A = r - mean(r of the same prompt's k samples)   # a baseline: only *relative* quality matters
        loss = - mean_i sum_t A_i log π_θ(a_t^i | s_t^i) / T
        one gradient step on loss

The gradient of that loss is the policy gradient ∇J = E[A Σ_t ∇ log π(a_t | s_t)] (DDPO eq. 3): each
denoising step is an action, and all steps of a trajectory share its terminal reward.

    python examples/reinforce_from_scratch.py                       # tiny-shapes, JPEG compressibility (~6 min)
    python examples/reinforce_from_scratch.py --smoke --model <pipeline folder> --reward jpeg_compressibility
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import diffusion_mdp  # noqa: F401  (registers DenoisingMDP-v0)
from diffusion_mdp.agents.base import add_lora
from diffusion_mdp.policy import DiffusionPolicy
from diffusion_mdp.prompts import load_prompts
from diffusion_mdp.viz import image_grid


@torch.no_grad()
def evaluate(
    policy: DiffusionPolicy, env: gym.vector.VectorEnv, num_batches: int, seed: int
) -> tuple[np.ndarray, list]:
    """Mean-comparable evaluation: fixed env seeds and a fixed policy generator (same noise before and after).

    Every prompt of the env's set is used equally often (``prompt_ids`` = 0, 1, ..., N-1).
    Returns the ``(num_batches * N,)`` rewards and the first batch's images.
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: bundled tiny-shapes)")
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--prompts", default="shapes_train")
    parser.add_argument("--eval-prompts", default="shapes_heldout")
    parser.add_argument("--epochs", type=int, default=30, help="policy-gradient steps (one batch each)")
    # Big batches, few steps: one batch's gradient is mostly noise (benchmarks/gradient_check.py), and AdamW
    # moves every weight by about lr per step whatever the signal, so many noisy steps random-walk the model.
    parser.add_argument("--batch", type=int, default=128, help="N episodes per gradient step")
    parser.add_argument("--group", type=int, default=4, help="k samples per prompt in a batch (1: batch baseline)")
    parser.add_argument("--steps", type=int, default=10, help="T denoising steps")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--adv-scale", type=float, default=10.0, help="A = scale * (r - prompt mean)")
    # The whole UNet: tiny-shapes' only cross-attention is at 4×4, so an attention LoRA has little leverage.
    parser.add_argument("--lora-rank", type=int, default=0, help="0: fine-tune the whole UNet; r > 0: a LoRA")
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/reinforce_from_scratch")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: tiny batch, 2 steps, 1 epoch")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.batch, args.group, args.steps, args.eval_batches = 1, 2, 2, 2, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # The MDP: N episodes in one batch; each ends after T steps with r(x_0, c).
    env_kwargs = dict(model=args.model, reward=args.reward, num_steps=args.steps, autoreset_mode="Disabled")
    env = gym.make_vec("DenoisingMDP-v0", num_envs=args.batch, prompts=args.prompts, **env_kwargs)
    eval_prompts = load_prompts(args.eval_prompts)
    n_eval = 2 if args.smoke else len(eval_prompts)
    eval_env = gym.make_vec(
        "DenoisingMDP-v0", num_envs=n_eval, prompts=eval_prompts, components=env.unwrapped.components, **env_kwargs
    )
    # In-distribution too: every training prompt once, fixed seeds.
    n_train = 2 if args.smoke else len(load_prompts(args.prompts))
    train_eval_env = gym.make_vec(
        "DenoisingMDP-v0", num_envs=n_train, prompts=args.prompts, components=env.unwrapped.components, **env_kwargs
    )

    # The policy: the diffusion model's DDIM Gaussian; all of its UNet is trained, or only a LoRA adapter (DDPO).
    policy = DiffusionPolicy.from_env(env, guidance_scale=args.guidance)
    if args.lora_rank:
        add_lora(policy.unet, rank=args.lora_rank, alpha=float(args.lora_rank))
    else:
        policy.unet.requires_grad_(True)
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)

    before, images_before = evaluate(policy, eval_env, args.eval_batches, seed=12345)
    train_before, _ = evaluate(policy, train_eval_env, 1, seed=54321)
    print(f"training-prompt reward before: {train_before.mean():.4f}")
    print(f"held-out reward before: {before.mean():.4f} ± {before.std():.4f}")

    k = args.group if args.batch % args.group == 0 else 1
    num_prompts = len(load_prompts(args.prompts))
    history = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        # 1. Roll out N episodes with the current policy, remembering every (s_t, a_t).
        # k samples of each of N/k prompts, so that each sample can be compared with its own prompt's others.
        rng = np.random.default_rng([args.seed, epoch])
        prompt_ids = np.repeat(rng.choice(num_prompts, args.batch // k, replace=args.batch // k > num_prompts), k)
        obs, _ = env.reset(seed=args.seed * 100_003 + epoch, options={"prompt_ids": prompt_ids})
        trajectory = []
        terminated = np.zeros(args.batch, dtype=bool)
        with torch.no_grad():
            while not terminated.all():
                actions, _ = policy.sample(obs)
                trajectory.append((obs, actions))
                obs, rewards, terminated, _, _ = env.step(actions)

        # 2. Advantages: the terminal reward minus a baseline, the mean reward of the same prompt in the batch
        #    (prompts differ in difficulty: a batch-wide baseline would mostly reward "being an easy prompt").
        #    No division by a std: when most prompts are solved (rewards ≈ 1), that std is ~1e-4 and dividing
        #    by it turns reward noise into full-size advantages, a random walk that wrecks the model.
        baseline = rewards.reshape(-1, k).mean(axis=1).repeat(k) if k > 1 else np.full_like(rewards, rewards.mean())
        advantages = torch.as_tensor((rewards - baseline) * args.adv_scale, dtype=torch.float32)

        # 3. The policy gradient. One backward per step keeps only one step's activations in memory; the
        #    gradients add up to ∇ of the sum over steps.
        for step_obs, step_actions in trajectory:
            log_prob = policy.log_prob(step_obs, step_actions)  # (N,), differentiable
            loss = -(advantages * log_prob).mean() / len(trajectory)
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

        history.append(float(rewards.mean()))
        print(
            f"epoch {epoch + 1:3d}  reward {rewards.mean():.4f} ± {rewards.std():.4f}  "
            f"grad-norm {grad_norm:.3g}  {time.perf_counter() - t0:.1f}s"
        )

    after, images_after = evaluate(policy, eval_env, args.eval_batches, seed=12345)
    train_after, _ = evaluate(policy, train_eval_env, 1, seed=54321)
    print(f"training-prompt reward after: {train_after.mean():.4f}   (before {train_before.mean():.4f})")
    print(f"held-out reward after:  {after.mean():.4f} ± {after.std():.4f}   (before {before.mean():.4f})")
    result = {
        "eval_before": float(before.mean()),
        "eval_after": float(after.mean()),
        "eval_before_std": float(before.std()),
        "eval_after_std": float(after.std()),
        "eval_samples": len(after),
        "train_prompts_before": float(train_before.mean()),
        "train_prompts_after": float(train_after.mean()),
        "train_reward": history,
        "args": vars(args),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    prompts = [eval_prompts.prompts[i] for i in range(n_eval)]
    captions = [f"before: {p}" for p in prompts] + [f"after: {p}" for p in prompts]
    image_grid(images_before + images_after, captions, columns=n_eval, scale=3).save(out / "before_after.png")
    return result


if __name__ == "__main__":
    main()
