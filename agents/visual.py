"""Pictures of a run: image grids with captions (PIL) and the reward curve (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def save_grid(
    images: np.ndarray,
    captions: Sequence[str],
    path: str | os.PathLike[str],
    ncols: int = 8,
    cell: int = 128,
    title: str | None = None,
) -> Path:
    """Save ``images`` as a grid with a caption under each.

    Args:
        images: ``uint8`` ``(B, H, W, 3)``.
        captions: ``B`` strings (e.g. prompt and reward), wrapped to the cell width.
        path: Output PNG.
        ncols: Columns.
        cell: Side of each image cell in pixels (small images are upscaled, nearest neighbour).
        title: Optional line on top.
    """
    images = np.asarray(images)
    count = len(images)
    ncols = max(1, min(ncols, count))
    nrows = int(np.ceil(count / ncols))
    font = ImageFont.load_default()
    chars_per_line = max(8, cell // 6)
    lines = [_wrap(str(c), chars_per_line)[:3] for c in captions]
    text_h = 12 * max((len(x) for x in lines), default=1) + 4
    top = 16 if title else 0
    canvas = Image.new("RGB", (ncols * cell, top + nrows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for i, image in enumerate(images):
        row, col = divmod(i, ncols)
        x, y = col * cell, top + row * (cell + text_h)
        canvas.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(lines[i] if i < len(lines) else []):
            draw.text((x + 2, y + cell + 2 + 12 * j), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


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
