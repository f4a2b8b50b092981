"""REINFORCE on the denoising MDP with nothing but the env, its UNet and the schedule: no policy class.

What a student writes from the paper alone. The env hands over the observations (x_t, t, prompt id) and
its DDIM schedule; the policy π_θ(x_{t-1} | x_t, c) = N(μ_θ, σ_t² I) is a ``torch.distributions.Normal``
built from the UNet's output with two calls of the schedule's documented API:

    schedule.mean(ε_θ(x_t, t, c), t, x_t)  -> μ_θ    (every step, the last one included)
    schedule.std_dev_t(t, like=x_t)        -> σ_t

(``alpha_prod_t``, ``alpha_prod_t_prev`` and ``t_prev`` are there too: docs/plug_in.md, "No policy class").
No classifier-free guidance, to stay short. The loss is DDPO-SF's: -A · Σ_t log π(a_t | s_t), with A the
batch-normalised terminal reward.

    python examples/no_policy_class.py                      # bundled tiny-shapes model, JPEG compressibility
    python examples/no_policy_class.py --iterations 2 --envs 4 --steps 4 --smoke
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch.distributions import Normal

import diffusion_mdp  # noqa: F401  (registers DenoisingMDP-v0)


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the bundled tiny-shapes model)")
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--envs", type=int, default=16, help="episodes per batch")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps T")
    parser.add_argument("--iterations", type=int, default=15, help="batches, one AdamW step each")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--out", type=Path, default=Path("runs/no_policy_class"))
    parser.add_argument("--smoke", action="store_true", help="tiny settings for the test suite")
    args = parser.parse_args()
    torch.manual_seed(0)

    env = gym.make_vec(
        "DenoisingMDP-v0",
        num_envs=args.envs,
        model=args.model,
        reward=args.reward,
        num_steps=args.steps,
        torch_obs=True,
        autoreset_mode="Disabled",  # every batch starts with our own seeded reset
    )
    schedule, model = env.unwrapped.schedule, env.unwrapped.components
    unet = model.unet.requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    initial = [p.detach().clone() for p in unet.parameters()]

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        tokens = model.tokenizer(prompts, padding="max_length", max_length=model.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids  # fmt: skip
        return model.text_encoder(tokens)[0]  # (N, L, D)

    rewards_per_iteration = []
    for iteration in range(args.iterations):
        # ---- SAMPLING: one batch of N episodes, keeping each step's log π with its graph ----------
        obs, info = env.reset(seed=iteration)
        cond = encode(list(info["prompt"]))  # the texts of obs["prompt_id"]
        log_probs = []  # T tensors of shape (N,)
        terminated = np.zeros(args.envs, dtype=bool)
        while not terminated.all():
            x_t, t = obs["latent"], obs["timestep"]  # (N, C, h, w), (N,)
            epsilon = unet(x_t, t, encoder_hidden_states=cond).sample
            policy = Normal(schedule.mean(epsilon, t, x_t), schedule.std_dev_t(t, like=x_t))
            action = policy.sample()  # x_{t-1}
            log_probs.append(policy.log_prob(action).mean(dim=(1, 2, 3)))  # DDPO's mean over latent dims
            obs, rewards, terminated, _, info = env.step(action)
        # ---- TRAINING: DDPO-SF's loss, one AdamW step ----------------------------------------------
        advantages = torch.as_tensor((rewards - rewards.mean()) / (rewards.std() + 1e-6), dtype=torch.float32)
        loss = -(advantages * torch.stack(log_probs).sum(dim=0)).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        rewards_per_iteration.append(float(rewards.mean()))
        print(f"iteration {iteration + 1}: mean reward {rewards.mean():.4f}  loss {loss.item():.4f}")

    change = sum(float((p.detach() - p0).norm()) for p, p0 in zip(unet.parameters(), initial, strict=True))
    result = {"reward_first": rewards_per_iteration[0], "reward_last": rewards_per_iteration[-1]}
    result["weight_change"] = change
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
