"""Does the DDPO policy gradient point uphill, and how far can one step go? A diagnostic for tuning.

Two measurements on a model and reward, with the agents' own rollouts and log-probs:

1. **Signal.** The policy gradient g = ∇_θ mean_{i,t} [A_i log π_θ(a_t^i | s_t^i)] from K independent
   batches of n samples (batch-normalised advantages). A mean pairwise cos(g_i, g_j) ≈ 0 means a batch of n
   is all noise; each estimate's cosine with the true gradient is about √cos(g_i, g_j).
2. **Step size.** A line search along d = Σ g_k / |Σ g_k|: the reward of θ + α d for a few α,
   scored with deterministic sampling (η = 0) on the same fixed noise for every α (common random numbers),
   so the differences to α = 0 are precise (their standard error is printed). A positive slope at small α
   says the estimator is right; where the curve turns over says how long a step the curvature allows.

    python benchmarks/gradient_check.py                                   # tiny-shapes, JPEG compressibility
    python benchmarks/gradient_check.py --reward prompt_alignment --prompts shapes_counting --lora
    python benchmarks/gradient_check.py --alphas 0,0.01,0.03,0.1,0.3,-0.1 --samples 256

Figures from it are in docs/agents.md ("Tuning on tiny-shapes").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters


def policy_gradient(agent: Any, epoch: int) -> tuple[torch.Tensor, float]:
    """The flattened gradient ``(P,)`` of DDPO-SF's loss -mean_{i,t} A_i log π(a_t^i | s_t^i) on fresh rollouts,
    and their mean reward."""
    stats = agent.collect_rollouts(epoch)
    agent.optimizer.zero_grad(set_to_none=True)
    agent.accumulate_gradient(epoch)  # DDPOSF's loss and backward passes, without its optimizer step
    grad = torch.cat([p.grad.flatten() for p in agent.trainable])
    agent.optimizer.zero_grad(set_to_none=True)
    return grad, stats["reward_mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-shapes")
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--prompts", default="shapes_train")
    parser.add_argument("--samples", type=int, default=128, help="n: samples per gradient estimate")
    parser.add_argument("--batches", type=int, default=4, help="independent gradient estimates (≥ 2)")
    parser.add_argument("--eval-samples", type=int, default=128, help="images per point of the line search")
    parser.add_argument("--alphas", default="0,0.01,0.03,0.1,-0.03,-0.1", help="step lengths along d (|d| = 1)")
    parser.add_argument("--lora", action="store_true", help="the gradient of a LoRA adapter instead of the UNet")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from diffusion_mdp.agents import make_agent
    from diffusion_mdp.agents.config import build_config

    config = build_config(
        preset="tiny-shapes",
        algorithm="ddpo_sf",  # its accumulate_gradient is the policy gradient
        name="gradient-check",
        output_dir=tempfile.mkdtemp(),
        model=args.model,
        reward=args.reward,
        prompts=args.prompts,
        eval_prompts=args.prompts,
        samples_per_epoch=args.samples,
        sample_batch_size=32,
        train_batch_size=32,
        gradient_accumulation_steps=1,  # no optimizer step is taken; any --samples that is a multiple of 32
        advantage_mode="batch",
        use_lora=args.lora,
        progress_bar=False,
        num_threads=args.threads,
    )
    agent = make_agent(config)
    params = agent.trainable
    num_params = sum(p.numel() for p in params)

    start = time.perf_counter()
    grads, means = zip(*(policy_gradient(agent, epoch=1000 + k) for k in range(args.batches)), strict=True)
    unit = [g / g.norm() for g in grads]
    cosines = [float(torch.dot(unit[i], unit[j])) for i in range(len(unit)) for j in range(i + 1, len(unit))]
    cos = float(np.mean(cosines))
    print(f"{args.reward} on {args.prompts}, {'LoRA' if args.lora else 'full UNet'} ({num_params:,} parameters)")
    print(f"{args.batches} batches of {args.samples}: mean rewards " + ", ".join(f"{m:.4f}" for m in means))
    print(
        f"cos(g_i, g_j) = {cos:.4f} (pairs: {min(cosines):.4f} .. {max(cosines):.4f}); each estimate's cosine with "
        f"the true gradient ≈ {np.sqrt(max(cos, 0)):.2f}, the sum's ≈ "
        f"{np.sqrt(max(cos, 0) * args.batches / (1 + (args.batches - 1) * max(cos, 0))):.2f}"
    )
    print(f"[{time.perf_counter() - start:.0f} s]")

    # Where the gradient lives: the parameter tensors holding most of |g|².
    g = torch.stack(grads).sum(dim=0)
    names = [n for n, p in agent.unet.named_parameters() if p.requires_grad]
    pieces = torch.split(g, [p.numel() for p in params])
    shares = [(float(piece.square().sum() / g.square().sum()), name) for piece, name in zip(pieces, names, strict=True)]
    top = sorted(shares, reverse=True)[:5]
    print("largest shares of |g|²: " + ", ".join(f"{name} {share:.2f}" for share, name in top))

    direction = -g / g.norm()  # the loss is minimised: -g ascends the reward
    theta0 = parameters_to_vector(params).detach()
    base = None
    print(f"line search, η = 0 on {args.eval_samples} fixed noises (common random numbers):")
    for alpha in [float(a) for a in args.alphas.split(",")]:
        with torch.no_grad():
            vector_to_parameters(theta0 + alpha * direction, params)
        rewards = agent.evaluate(args.eval_samples)["rewards"]
        base = rewards if base is None else base
        diff = rewards - base
        print(
            f"  α = {alpha:+7.3f}: reward {rewards.mean():.4f}   change {diff.mean():+.4f} ± "
            f"{diff.std() / np.sqrt(len(diff)):.4f}"
        )


if __name__ == "__main__":
    main()
