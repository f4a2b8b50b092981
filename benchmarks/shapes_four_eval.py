"""Strict accuracy (``shapes_geneval``) of the base model or of runs' checkpoints on the "four …" task.

Samples ``--per-prompt`` images per prompt of ``shapes_four`` (training pairs) and ``shapes_four_heldout``
(unseen pairs) with the main job's sampler (10 DDIM steps, η = 1, CFG 5, fp32) from fixed seeds, so the
base model and a checkpoint see the same noise, and prints the fraction the judge finds exactly right, its
standard error, and the count / colour / shape parts.

Given several runs (the same recipe at several seeds, say), it also measures the base model on that noise
and prints each run's gain in points (after − before, paired on the same noise) with their mean and
Student's t 95 % interval over the runs: the spread over seeds, which one run's standard error does not show.

    PYTHONPATH=. .venv/bin/python benchmarks/shapes_four_eval.py                       # the base model
    PYTHONPATH=. .venv/bin/python benchmarks/shapes_four_eval.py --run runs/tiny-shapes-counting
    ... --run runs/seed0 runs/seed1 runs/seed2    # gains over seeds
    ... --grid docs/main_job/after.png   # also a picture: 2 samples per prompt of each set, with verdicts
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from reproduce.claims import mean_interval
from tiny_shapes_report import load_pipeline, sample

from diffusion_mdp.prompts import load_prompts
from diffusion_mdp.rewards.shapes_geneval import judge_images
from diffusion_mdp.shapes import model_path

PROMPT_SETS = ("shapes_four", "shapes_four_heldout")


def load_run(pipe: Any, run: str | Path, base_weights: dict[str, torch.Tensor]) -> str:
    """Put ``run``'s last checkpoint into ``pipe.unet`` (from the base weights); return its label."""
    state = torch.load(Path(run) / "checkpoints" / "last.pt", weights_only=False, map_location="cpu")
    missing = set(state["trainable"]) - base_weights.keys()
    if missing:
        raise SystemExit(
            f"{run}: checkpoint weights the UNet lacks ({sorted(missing)[:2]}): LoRA runs "
            "are not supported here, use full fine-tuning"
        )
    pipe.unet.load_state_dict(base_weights)
    pipe.unet.load_state_dict(state["trainable"], strict=False)
    return f"{run} epoch {state['epoch']}"


def evaluate(
    pipe: Any, label: str, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, np.ndarray], list[tuple[np.ndarray, str]]]:
    """Judge ``pipe``'s samples of both prompt sets on the fixed noise; print and return the accuracies.

    Returns:
        ``(accuracy per prompt set, arrays to save, (image, caption) pairs for the grid)``.
    """
    accuracies: dict[str, float] = {}
    saved: dict[str, np.ndarray] = {}
    shown: list[tuple[np.ndarray, str]] = []
    for name in PROMPT_SETS:
        ps = load_prompts(name)
        prompts = [p for p in ps.prompts for _ in range(args.per_prompt)]
        meta = [m for m in ps.metadata for _ in range(args.per_prompt)]
        images = np.concatenate(
            [
                sample(
                    pipe,
                    prompts[i : i + 64],
                    steps=args.steps,
                    eta=args.eta,
                    guidance=5.0,
                    seed=args.seed + i,
                    bf16=False,
                )
                for i in range(0, len(prompts), 64)
            ]
        )
        v = judge_images(images, meta)
        acc = float(v["correct"].mean())
        se = np.sqrt(acc * (1 - acc) / len(prompts))
        print(
            f"{label} | {name}: strict {acc:.3f} ± {se:.3f} (n={len(prompts)}); count {v['count_match'].mean():.3f}"
            f" colour {v['colour_match'].mean():.3f} shape {v['shape_match'].mean():.3f};"
            f" objects {np.bincount(v['num_objects'], minlength=7)[:7].tolist()}",
            flush=True,
        )
        accuracies[name] = acc
        saved[name] = images
        saved[name + "_correct"] = v["correct"]
        for i in range(0, len(prompts), args.per_prompt):
            for j in range(i, min(i + 2, len(prompts))):
                shown.append((images[j], f"{prompts[j]} | {'right' if v['correct'][j] else 'wrong'}"))
    return accuracies, saved, shown


def gains_over_runs(
    base: dict[str, float], runs: list[dict[str, float]]
) -> dict[str, tuple[list[float], float, float, float]]:
    """Each run's gain in points per prompt set, and their mean with its 95 % t interval.

    >>> out = gains_over_runs({"a": 0.5}, [{"a": 0.7}, {"a": 0.8}, {"a": 0.9}])
    >>> [round(g, 1) for g in out["a"][0]], round(out["a"][1], 1), round(out["a"][3] - out["a"][1], 1)
    ([20.0, 30.0, 40.0], 30.0, 24.8)
    """
    out = {}
    for name in base:
        gains = [100.0 * (run[name] - base[name]) for run in runs]
        out[name] = (gains, *mean_interval(gains))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", nargs="+", default=[], help="run folders whose checkpoints/last.pt to load (none = the base model)"
    )
    parser.add_argument("--per-prompt", type=int, default=16, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first batch's noise")
    parser.add_argument("--save", default="", help="write the images and verdicts to this .npz (one run)")
    parser.add_argument(
        "--grid", default="", help="write a PNG of the first 2 samples per prompt, with verdicts (one run)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    args = parser.parse_args(argv)
    if len(args.run) > 1 and (args.save or args.grid):
        parser.error("--save and --grid write one model's samples: give them with a single --run")
    for run in args.run:
        if not (Path(run) / "checkpoints" / "last.pt").is_file():
            parser.error(f"{run}: no checkpoints/last.pt there (is it a run folder of `diffusion-mdp train`?)")

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(model_path())
    base_weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    results: dict[str, Any] = {}
    label = "base model"
    if len(args.run) != 1:
        results["base"], saved, shown = evaluate(pipe, label, args)
    runs = []
    for run in args.run:
        label = load_run(pipe, run, base_weights)
        accuracies, saved, shown = evaluate(pipe, label, args)
        runs.append(accuracies)
    results["runs"] = runs
    if len(runs) > 1:
        results["gains"] = gains_over_runs(results["base"], runs)
        for name, (gains, mean, low, high) in results["gains"].items():
            print(
                f"{len(runs)} runs | {name}: base {results['base'][name]:.3f}; gain in points per run "
                f"{', '.join(f'{g:+.1f}' for g in gains)}; mean {mean:+.1f} [{low:+.1f}, {high:+.1f}] (95 % t)"
            )
    if args.save:
        np.savez_compressed(args.save, **saved)
    if args.grid:
        from diffusion_mdp.viz import image_grid

        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        title = f"{label}: the same noise for every model (10 DDIM steps, eta 1, CFG 5); judge shapes_geneval"
        image_grid([im for im, _ in shown], [c for _, c in shown], columns=6, scale=3, title=title).save(args.grid)
        print(f"wrote {args.grid}")
    return results


if __name__ == "__main__":
    main()
