"""Small helpers shared by the lessons: settings (smoke mode, output folder, model), figures, evaluation.

Settings, read once at import (so a lesson is a plain script and a plain notebook):

- smoke mode: ``--smoke`` on the command line or ``LESSON_SMOKE=1`` — tiny batches and few steps, for CI;
- output folder: ``--out DIR`` or ``LESSON_OUT`` (default ``runs/lessons``), where figures and results go;
- ``LESSON_MODEL``: a pipeline folder instead of the bundled tiny-shapes model (CI without it);
- ``LESSON_REWARD``: the alignment reward to use (default ``prompt_alignment``; another model's images
  cannot be read by the tiny-shapes captioner, so CI with another model sets ``jpeg_compressibility``);
- ``LESSON_THREADS``: torch threads (default 2).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures go to files; no display needed
import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
import torch

_parser = argparse.ArgumentParser(add_help=False)
_parser.add_argument("--smoke", action="store_true")
_parser.add_argument("--out", default=None)
_args, _ = _parser.parse_known_args()  # tolerate a notebook kernel's own arguments

SMOKE: bool = _args.smoke or os.environ.get("LESSON_SMOKE", "0") not in ("", "0")
OUT = Path(_args.out or os.environ.get("LESSON_OUT") or "runs/lessons")
MODEL: str | None = os.environ.get("LESSON_MODEL") or None
REWARD: str = os.environ.get("LESSON_REWARD") or "prompt_alignment"
torch.set_num_threads(int(os.environ.get("LESSON_THREADS", "2")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pick(full: Any, smoke: Any) -> Any:
    """``full`` normally, ``smoke`` in smoke mode (a knob per experiment size)."""
    return smoke if SMOKE else full


def save_figure(fig: plt.Figure, name: str) -> Path:
    """Save ``fig`` as ``OUT/name`` (PNG) and close it."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"figure saved to {path}")
    return path


def save_results(name: str, results: dict[str, Any]) -> Path:
    """Write a lesson's key numbers as ``OUT/name`` (JSON), for the tests and for you."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(results, indent=2, default=float))
    return path


def show_images(axes: Any, images: Any, titles: list[str] | None = None) -> None:
    """Draw uint8 ``(H, W, 3)`` images into a row of matplotlib axes, without ticks."""
    for i, ax in enumerate(np.atleast_1d(axes)):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i], interpolation="nearest")
            if titles:
                ax.set_title(titles[i], fontsize=7)


@torch.no_grad()
def evaluate(policy: Any, env: gym.vector.VectorEnv, num_batches: int = 1, seed: int = 12345) -> dict[str, Any]:
    """Fixed-seed evaluation: the same prompts, initial noise and policy noise every time it is called.

    Every prompt of ``env``'s set is used once per batch (``prompt_ids`` = 0..N-1), so before/after
    differences come from the policy, not from the draw.

    Returns:
        ``{"rewards": (num_batches * N,), "mean": float, "images": (N, H, W, 3) of the first batch,
        "prompts": its N prompts}``.
    """
    rewards, images, prompts = [], None, None
    for b in range(num_batches):
        obs, _ = env.reset(seed=seed + 1000 * b, options={"prompt_ids": np.arange(env.num_envs)})
        generator = torch.Generator().manual_seed(seed + b)
        terminated = np.zeros(env.num_envs, dtype=bool)
        while not terminated.all():
            actions, _ = policy.sample(obs, generator=generator)
            obs, reward, terminated, _, info = env.step(actions)
        rewards.append(reward)
        if images is None:
            images, prompts = info["image"], list(info["prompt"])
    all_rewards = np.concatenate(rewards)
    return {"rewards": all_rewards, "mean": float(all_rewards.mean()), "images": images, "prompts": prompts}
