"""Pictures of a run: image grids with captions (PIL) and the reward curve (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_mdp.viz import image_grid


def save_grid(
    images: np.ndarray,
    captions: Sequence[str],
    path: str | os.PathLike[str],
    ncols: int = 8,
    cell: int = 128,
    title: str | None = None,
) -> Path:
    """Save ``images`` as a grid with a caption under each (``diffusion_mdp.viz.image_grid``).

    Args:
        images: ``uint8`` ``(B, H, W, 3)``.
        captions: ``B`` strings (e.g. prompt and reward), wrapped to the cell width, up to 3 lines.
        path: Output PNG.
        ncols: Columns.
        cell: Side of each image cell in pixels (small images are upscaled, nearest neighbour).
        title: Optional line on top.
    """
    columns = max(1, min(ncols, len(images)))
    grid = image_grid(images, captions, columns=columns, caption_lines=3, cell=cell, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def plot_rewards(
    history: Sequence[dict[str, Any]], eval_history: Sequence[dict[str, Any]], path: str | os.PathLike[str]
) -> Path:
    """Training reward (mean ± std per epoch) and held-out evaluation reward against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if history:
        epochs = np.array([h["epoch"] for h in history])
        mean = np.array([h["reward_mean"] for h in history])
        std = np.array([h["reward_std"] for h in history])
        ax.plot(epochs, mean, label="training samples (η = 1)")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    if eval_history:
        ax.plot(
            [e["epoch"] for e in eval_history],
            [e["eval_reward_mean"] for e in eval_history],
            "o-",
            label="held-out prompts (η = 0, fixed seeds)",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
