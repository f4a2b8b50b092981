"""The best RWR can do: fine-tune the bundled UNet on ground-truth renders with RWR's loss, at RWR's lr.

RWR (``agents/rwr.py``) regresses the denoiser on the x_0 of the model's own samples, weighted by the reward;
sparse RWR keeps only the right ones. Its ideal input is therefore a set of pictures that are all right. This
script hands the same regression exactly that — procedural renders of "four <colour> <shape>s" for the RL
prompts (``shapes_four_rl_train``), drawn by the generator that made the model's training data — and asks
whether it raises the judge's accuracy. If it cannot at a learning rate, no reward weighting of the model's
own samples can either, and RWR's failure at that rate is the fine-tuning step, not the reward.

Per optimizer step (as sparse RWR in the claims grid: 10 epochs × 8 steps of 32 trajectories × 10 timestep
slots): 32 fresh renders, encoded by the bundled VAE (posterior mean × scaling factor); for each, 10 draws of
t ~ U{0..999} and ε ~ N(0, I); loss = mean ‖ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t, c) − ε‖² over the 320 pairs and the
latent's elements (RWR's ``rwr_guided_loss=False`` target: the conditional ε, no guidance); AdamW with the
agents' defaults (β 0.9 / 0.999, weight decay 1e-4, gradient clipped at norm 1), full fine-tuning of the UNet.
Measured before and after as the claims grid measures (``benchmarks/claims.py``: 10 DDIM steps, η = 1, CFG 5,
16 images per prompt of each set on seed 0's noise).

``python benchmarks/rwr_oracle.py --lrs 1e-4 1e-5`` writes ``<out>/results.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def renders(prompt_set, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """``n`` ground-truth images ``(n, H, W, 3)`` uint8 for random prompts of ``prompt_set``, and their prompts."""
    from diffusion_mdp.shapes.dataset import ShapeSpec, render

    picks = rng.integers(0, len(prompt_set.prompts), n)
    images = [render(ShapeSpec(**_spec(prompt_set.metadata[i])), rng) for i in picks]
    return np.stack(images), [prompt_set.prompts[i] for i in picks]


def _spec(metadata: dict) -> dict:
    return {"count": int(metadata["count"]), "colour": metadata["colour"], "shape": metadata["shape"]}


def fine_tune(
    lr: float, steps: int, batch: int, draws: int, seed: int, checkpoint: Path, cond_dropout: float = 0.0
) -> dict[str, float]:
    """Fine-tune a fresh copy of the bundled UNet on renders; writes ``{"trainable": state_dict}`` to ``checkpoint``.

    ``cond_dropout``: the fraction of (render, draw) pairs trained with the empty prompt instead (the base model's
    own training used 0.1), so that the unconditional branch, which classifier-free guidance subtracts ×(w − 1),
    moves with the conditional one.
    """
    from tiny_shapes_report import load_pipeline

    from diffusion_mdp.prompts import load_prompts
    from diffusion_mdp.shapes import model_path

    pipe = load_pipeline(model_path())
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    prompt_set = load_prompts("shapes_four_rl_train")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    alphas = scheduler.alphas_cumprod
    unet.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        images, prompts = renders(prompt_set, batch, rng)
        with torch.no_grad():
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            x0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor  # (batch, C, h, w)
            cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)  # (batch, L, D) each
        x0, cond, uncond = x0.repeat(draws, 1, 1, 1), cond.repeat(draws, 1, 1), uncond.repeat(draws, 1, 1)
        dropped = torch.rand(len(x0)) < cond_dropout  # (draws · batch,)
        cond = torch.where(dropped.view(-1, 1, 1), uncond, cond)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),))
        eps = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 10 == 0:
            print(f"[oracle] lr {lr:g} step {step + 1}/{steps} loss {np.mean(losses[-10:]):.4f}", flush=True)
    torch.save({"trainable": unet.state_dict()}, checkpoint)
    return {"loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
            "train_s": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 1e-5])
    p.add_argument("--steps", type=int, default=80, help="optimizer steps (sparse RWR's 10 epochs × 8)")
    p.add_argument("--batch", type=int, default=32, help="renders per step")
    p.add_argument("--draws", type=int, default=10, help="(t, ε) draws per render and step (RWR's T slots)")
    p.add_argument("--cond-dropout", nargs="+", type=float, default=[0.0], help="fractions to try (each lr)")
    p.add_argument("--seed", type=int, default=0, help="training draws and the measurement's noise (as claims)")
    p.add_argument("--per-prompt", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/rwr-oracle"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from reproduce.claims import SETS, measure

    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k != "out"}}
    results["base"] = measure("tiny-shapes", None, args.seed, args.per_prompt, 10)["scores"]
    settings = [(lr, dropout) for lr in args.lrs for dropout in args.cond_dropout]
    for lr, dropout in settings:
        checkpoint = args.out / f"lr{lr:g}-dropout{dropout:g}.pt"
        training = fine_tune(lr, args.steps, args.batch, args.draws, args.seed, checkpoint, dropout)
        after = measure("tiny-shapes", checkpoint, args.seed, args.per_prompt, 10)["scores"]
        results[f"lr {lr:g}, caption dropout {dropout:g}"] = {"training": training, "after": after}
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("| fine-tuned on renders | " + " | ".join(f"judge `{s}`" for s in SETS) + " | loss first → last 10 steps |")
    print("|---|" + "---|" * (len(SETS) + 1))
    print("| base | " + " | ".join(f"{results['base'][s]['judge']:.3f}" for s in SETS) + " | — |")
    for lr, dropout in settings:
        r = results[f"lr {lr:g}, caption dropout {dropout:g}"]
        cells = " | ".join(f"{r['after'][s]['judge']:.3f}" for s in SETS)
        loss = f"{r['training']['loss_first10']:.4f} → {r['training']['loss_last10']:.4f}"
        print(f"| lr {lr:g}, caption dropout {dropout:g}, {args.steps} steps | {cells} | {loss} |")
    return results


if __name__ == "__main__":
    main()
