"""Step through one denoising episode by hand and save a strip of its states, from noise to image.

The agent here is the diffusion model itself (no training): at each step the policy samples the next
latent x_{t-1} ~ π(· | x_t, c), we pass it to ``env.step`` as the action, and we decode the latent we are
at, so the strip shows the MDP's states. The reward arrives only at the last step.

    python examples/denoise_by_hand.py                      # the bundled tiny-shapes model
    python examples/denoise_by_hand.py --prompt "two blue squares" --steps 20 --out strip.png
    python examples/denoise_by_hand.py --model path/to/stable-diffusion-folder --reward jpeg_incompressibility
"""

from __future__ import annotations

import argparse
import os

import gymnasium as gym
import numpy as np
import torch

import diffusion_mdp  # noqa: F401  (registers DenoisingMDP-v0)
from diffusion_mdp.policy import DiffusionPolicy
from diffusion_mdp.viz import image_grid


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder or hub id (default: bundled tiny-shapes)")
    parser.add_argument("--prompt", default=None, help="one prompt (default: a prompt drawn from the model's set)")
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--steps", type=int, default=20, help="number of DDIM steps T")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--frames", type=int, default=8, help="states to show in the strip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="denoising_strip.png")
    args = parser.parse_args(argv)

    env = gym.make(
        "DenoisingMDP-v0",
        model=args.model,
        reward=args.reward,
        prompts=[args.prompt] if args.prompt else None,
        num_steps=args.steps,
        render_mode="rgb_array",
    )
    policy = DiffusionPolicy.from_env(env, guidance_scale=args.guidance)
    generator = torch.Generator().manual_seed(args.seed)

    obs, _ = env.reset(seed=args.seed)
    show = set(np.linspace(0, args.steps, args.frames).round().astype(int).tolist())
    frames, captions = [], []
    terminated, step = False, 0
    while not terminated:
        if step in show:  # the state s_t: decode x_t
            frames.append(env.render())
            captions.append(f"t={int(obs['timestep'])}")
        action, log_prob = policy.sample(obs, generator=generator)
        obs, reward, terminated, _, info = env.step(action[0].numpy())
        step += 1
        print(f"step {step:3d}  t={int(obs['timestep']):4d}  log π(a|s)={log_prob.item():+.4f}  reward={reward:+.3f}")
    frames.append(info["image"])
    captions.append(f"x_0  r={reward:+.2f}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    strip = image_grid(frames, captions, columns=len(frames), scale=max(1, 128 // frames[0].shape[0]))
    strip.save(args.out)
    print(f"prompt: {info['prompt']!r}   reward ({args.reward}): {reward:+.3f}   strip saved to {args.out}")
    return reward


if __name__ == "__main__":
    main()
