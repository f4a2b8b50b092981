"""Pictures: labelled image grids and strips (PIL only, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def image_grid(
    images: np.ndarray | Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    columns: int | None = None,
    scale: int = 1,
    caption_height: int = 24,
) -> Image.Image:
    """Tile images into one picture, each with an optional caption underneath.

    Args:
        images: ``uint8`` images ``(N, H, W, 3)`` (or a list of ``(H, W, 3)``).
        captions: One caption per image (long captions wrap onto a second line).
        columns: Images per row (default: up to 8).
        scale: Integer upscaling (nearest neighbour, so small images stay crisp).
        caption_height: Pixels reserved under each image for its caption.

    Returns:
        A PIL image.

    >>> grid = image_grid(np.zeros((3, 8, 8, 3), np.uint8), ["a", "b", "c"], columns=2, scale=4)
    >>> grid.size
    (70, 118)
    """
    images = [np.asarray(im) for im in images]
    if not images:
        raise ValueError("image_grid needs at least one image")
    n = len(images)
    columns = columns or min(n, 8)
    rows = (n + columns - 1) // columns
    height, width = images[0].shape[0] * scale, images[0].shape[1] * scale
    label = caption_height if captions is not None else 0
    pad = 2
    grid = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + label + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, image in enumerate(images):
        row, col = divmod(i, columns)
        x, y = pad + col * (width + pad), pad + row * (height + label + pad)
        tile = Image.fromarray(image).resize((width, height), Image.NEAREST)
        grid.paste(tile, (x, y))
        if captions is not None:
            _draw_caption(draw, captions[i], x, y + height + 1, width, font)
    return grid


def _draw_caption(draw: ImageDraw.ImageDraw, text: str, x: int, y: int, width: int, font) -> None:
    """Write ``text`` in up to two lines that fit ``width`` pixels."""
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    for k, text_line in enumerate(lines[:2]):
        draw.text((x, y + 11 * k), text_line, fill="black", font=font)
