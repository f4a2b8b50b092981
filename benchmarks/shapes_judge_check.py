"""Accuracy of the ``shapes_geneval`` judge on fresh procedural images (ground truth from the generator).

Draws ``--n`` images with :func:`diffusion_mdp.shapes.dataset.make_dataset` (every colour–shape pair,
counts 1–4, a seed no training used) and reports how often the judge reads the exact count, colour and
shape, per attribute and per count, with the mistakes it made. ``--noise`` adds Gaussian pixel noise of
that standard deviation (in 0–255 units), to see how far the reading holds on imperfect images.

    PYTHONPATH=. .venv/bin/python benchmarks/shapes_judge_check.py --n 2000 --seed 12345
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from diffusion_mdp.rewards.shapes_geneval import detect_objects, judge_images
from diffusion_mdp.shapes.dataset import COUNTS, make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images to judge")
    parser.add_argument("--seed", type=int, default=12345, help="seed of make_dataset")
    parser.add_argument("--noise", type=float, default=0.0, help="std of added Gaussian pixel noise (0-255)")
    args = parser.parse_args()

    images, specs = make_dataset(args.n, seed=args.seed)
    if args.noise > 0:
        rng = np.random.default_rng(args.seed + 1)
        images = np.clip(images + rng.normal(0, args.noise, images.shape), 0, 255).round().astype(np.uint8)
    verdict = judge_images(images, [s.as_dict() for s in specs])
    print(f"{args.n} fresh procedural images (seed {args.seed}, noise std {args.noise}):")
    for key in ("correct", "count_match", "colour_match", "shape_match"):
        print(f"  {key:13s} {verdict[key].mean():.2%}")
    counts = np.array([s.count for s in specs])
    print("  strict accuracy per count: " + ", ".join(
        f"{n}: {verdict['correct'][counts == n].mean():.2%}" for n in COUNTS))
    mistakes: Counter[str] = Counter()
    for i in np.nonzero(~verdict["correct"])[0]:
        found = [(o.colour, o.shape) for o in detect_objects(images[i])]
        mistakes[f"{specs[i].caption} -> {Counter(found).most_common()}"] += 1
    for text, k in mistakes.most_common(10):
        print(f"  mistake x{k}: {text}")


if __name__ == "__main__":
    main()
