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
    caption_lines: int = 2,
    cell: int | None = None,
    title: str | None = None,
) -> Image.Image:
    """Tile images into one picture, each with an optional caption underneath.

    Args:
        images: ``uint8`` images ``(N, H, W, 3)`` (or a list of ``(H, W, 3)``).
        captions: One caption per image (long captions wrap onto a second line).
        columns: Images per row (default: up to 8).
        scale: Integer upscaling (nearest neighbour, so small images stay crisp).
        caption_lines: Lines of wrapped caption kept under each image (11 pixels each).
        cell: Side of each square tile in pixels, overriding ``scale``.
        title: Optional line of text above the grid.

    Returns:
        A PIL image.

    >>> grid = image_grid(np.zeros((3, 8, 8, 3), np.uint8), ["a", "b", "c"], columns=2, scale=4)
    >>> grid.size
    (70, 118)

    Characters the built-in font lacks are drawn as their ASCII look-alikes, not as boxes:

    >>> def caption(text): return image_grid(np.zeros((1, 8, 8, 3), np.uint8), [text], scale=8).tobytes()
    >>> caption("1 − judge") == caption("1 - judge") != caption("1 + judge")
    True
    """
    images = [np.asarray(im) for im in images]
    if not images:
        raise ValueError("image_grid needs at least one image")
    n = len(images)
    columns = columns or min(n, 8)
    rows = (n + columns - 1) // columns
    if cell is not None:
        height = width = cell
    else:
        height, width = images[0].shape[0] * scale, images[0].shape[1] * scale
    label = 11 * caption_lines + 2 if captions is not None else 0
    pad = 2
    top = 16 if title else 0
    size = (columns * (width + pad) + pad, top + rows * (height + label + pad) + pad)
    grid = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    if title:
        draw.text((4, 2), title.translate(_PLAIN), fill="black", font=font)
    for i, image in enumerate(images):
        row, col = divmod(i, columns)
        x, y = pad + col * (width + pad), top + pad + row * (height + label + pad)
        tile = Image.fromarray(image).resize((width, height), Image.NEAREST)
        grid.paste(tile, (x, y))
        if captions is not None and i < len(captions):
            _draw_caption(draw, str(captions[i]), x, y + height + 1, width, font, caption_lines)
    return grid


_PLAIN = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "x", "\u2192": "->"})


def _draw_caption(
    draw: ImageDraw.ImageDraw, text: str, x: int, y: int, width: int, font: ImageFont.ImageFont, max_lines: int
) -> None:
    """Write ``text`` in up to ``max_lines`` lines that fit ``width`` pixels."""
    # PIL's built-in font has no glyphs for these: they would print as boxes.
    text = text.translate(_PLAIN)
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    for k, text_line in enumerate(lines[:max_lines]):
        draw.text((x, y + 11 * k), text_line, fill="black", font=font)
