"""Overhead of the vector environment over a plain sampling loop: what the Gymnasium interface costs.

Workload: the reference tiny pipeline (``diffusion_mdp.testing``), 16 environments × 20 DDIM steps, CFG 5,
JPEG compressibility. Both sides make the same policy calls on the same batch; the plain loop updates a
latent tensor itself, decodes once and calls the reward once, i.e. what a hand-written sampler does. The
vector env runs in its fast mode (``torch_obs=True``). Rounds alternate between the two and the median is
reported, so both see the same machine load.

    python benchmarks/env_overhead.py [--envs 16] [--steps 20] [--rounds 5]

Target: ratio (vector env / plain loop) ≤ 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from diffusion_mdp.envs import DenoisingVectorEnv
from diffusion_mdp.mdp import decode_latents
from diffusion_mdp.models import load_components
from diffusion_mdp.policy import DiffusionPolicy
from diffusion_mdp.rewards import make_reward
from diffusion_mdp.testing import build_reference_tiny_pipeline


def rollout_env(env: DenoisingVectorEnv, policy: DiffusionPolicy, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    obs, _ = env.reset(seed=seed)
    terminated = False
    while not terminated:
        actions, _ = policy.sample(obs, generator=generator)
        obs, rewards, terminations, _, _ = env.step(actions)
        terminated = bool(terminations[0])
    return float(rewards.mean())


def rollout_plain(policy: DiffusionPolicy, prompts: list[str], reward, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), *policy.components.latent_shape, generator=generator)
    for t in policy.schedule.timesteps:
        obs = {"latent": latents, "timestep": t.repeat(len(prompts)), "prompt": prompts}
        latents, _ = policy.sample(obs, generator=generator)
    images = decode_latents(policy.components.vae, latents)
    rewards, _ = reward(images, prompts, [{}] * len(prompts))
    return float(rewards.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    folder = build_reference_tiny_pipeline(tempfile.mkdtemp())
    components = load_components(folder)
    prompts = ["a red circle", "two blue squares", "three green triangles", "a cat riding a bike"]
    env = DenoisingVectorEnv(args.envs, components=components, prompts=prompts, num_steps=args.steps, torch_obs=True)
    policy = DiffusionPolicy.from_env(env, guidance_scale=5.0)
    reward = make_reward("jpeg_compressibility")
    batch_prompts = [prompts[i % len(prompts)] for i in range(args.envs)]

    rollout_env(env, policy, 0)  # warm-up (allocator, prompt cache)
    rollout_plain(policy, batch_prompts, reward, 0)
    env_times, plain_times = [], []
    for r in range(args.rounds):
        start = time.perf_counter()
        rollout_env(env, policy, r)
        env_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        rollout_plain(policy, batch_prompts, reward, r)
        plain_times.append(time.perf_counter() - start)

    env_s, plain_s = statistics.median(env_times), statistics.median(plain_times)
    print(f"workload: reference tiny pipeline, {args.envs} envs x {args.steps} steps, CFG 5, {args.rounds} rounds")
    for label, median, times in (("vector env (torch_obs)", env_s, env_times), ("plain loop", plain_s, plain_times)):
        print(f"{label:24s}{median:.3f} s/rollout (median of {', '.join(f'{t:.3f}' for t in times)})")
    print(f"ratio env/plain: {env_s / plain_s:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
