"""Strict accuracy (``shapes_geneval``) of the base model or a run's checkpoint on the "four …" task.

Samples ``--per-prompt`` images per prompt of ``shapes_four`` (training pairs) and ``shapes_four_heldout``
(unseen pairs) with the main job's sampler (10 DDIM steps, η = 1, CFG 5, fp32) from fixed seeds, so the
base model and a checkpoint see the same noise, and prints the fraction the judge finds exactly right, its
standard error, and the count / colour / shape parts.

    PYTHONPATH=. .venv/bin/python benchmarks/shapes_four_eval.py                       # the base model
    PYTHONPATH=. .venv/bin/python benchmarks/shapes_four_eval.py --run runs/tiny-shapes-counting
    ... --grid docs/main_job/after.png   # also a picture: 2 samples per prompt of each set, with verdicts
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_shapes_report import load_pipeline, sample

from diffusion_mdp.prompts import load_prompts
from diffusion_mdp.rewards.shapes_geneval import judge_images
from diffusion_mdp.shapes import model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="", help="run folder whose checkpoints/last.pt to load ('' = base model)")
    parser.add_argument("--per-prompt", type=int, default=16, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first batch's noise")
    parser.add_argument("--save", default="", help="write the images and verdicts to this .npz")
    parser.add_argument("--grid", default="", help="write a PNG of the first 2 samples per prompt, with verdicts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(model_path())
    label = "base model"
    if args.run:
        state = torch.load(Path(args.run) / "checkpoints" / "last.pt", weights_only=False, map_location="cpu")
        missing = set(state["trainable"]) - dict(pipe.unet.named_parameters()).keys()
        if missing:
            raise SystemExit(f"{args.run}: checkpoint weights the UNet lacks ({sorted(missing)[:2]}): LoRA runs "
                             "are not supported here, use full fine-tuning")
        pipe.unet.load_state_dict(state["trainable"], strict=False)
        label = f"{args.run} epoch {state['epoch']}"
    saved = {}
    shown: list[tuple[np.ndarray, str]] = []
    for name in ("shapes_four", "shapes_four_heldout"):
        ps = load_prompts(name)
        prompts = [p for p in ps.prompts for _ in range(args.per_prompt)]
        meta = [m for m in ps.metadata for _ in range(args.per_prompt)]
        images = np.concatenate([
            sample(pipe, prompts[i : i + 64], steps=args.steps, eta=args.eta, guidance=5.0, seed=args.seed + i,
                   bf16=False)
            for i in range(0, len(prompts), 64)
        ])
        v = judge_images(images, meta)
        acc = v["correct"].mean()
        se = np.sqrt(acc * (1 - acc) / len(prompts))
        print(f"{label} | {name}: strict {acc:.3f} ± {se:.3f} (n={len(prompts)}); count {v['count_match'].mean():.3f}"
              f" colour {v['colour_match'].mean():.3f} shape {v['shape_match'].mean():.3f};"
              f" objects {np.bincount(v['num_objects'], minlength=7)[:7].tolist()}")
        saved[name] = images
        for i in range(0, len(prompts), args.per_prompt):
            for j in range(i, min(i + 2, len(prompts))):
                shown.append((images[j], f"{prompts[j]} | {'right' if v['correct'][j] else 'wrong'}"))
        saved[name + "_correct"] = v["correct"]
    if args.save:
        np.savez_compressed(args.save, **saved)
    if args.grid:
        from diffusion_mdp.viz import image_grid

        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        title = f"{label}: the same noise for every model (10 DDIM steps, eta 1, CFG 5); judge shapes_geneval"
        image_grid([im for im, _ in shown], [c for _, c in shown], columns=6, scale=3, title=title).save(args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
