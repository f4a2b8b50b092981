"""Procedural captioned images of coloured shapes: the data of the bundled tiny-shapes model.

Each image shows 1 to 4 shapes of one colour and one kind on a plain white background, and its caption
names the count, the colour and the shape: ``"a red circle"``, ``"three blue triangles"``. Everything is
deterministic given a seed (a :class:`numpy.random.Generator` draws the spec and the layout).

Some colour–shape combinations (:data:`HELDOUT_COMBOS`) never appear in the generator's training data, so
a prompt such as ``"two blue triangles"`` measures generalisation to unseen compositions. The captioner,
being the judge, is trained on every combination.

Shapes are drawn at 4× the resolution and box-downsampled, so edges are anti-aliased but the inside of a
shape is exactly its palette colour; shapes never touch (at least :data:`MIN_GAP` pixels apart), so the
number of connected components of a colour equals the count.

>>> spec = ShapeSpec(count=2, colour="red", shape="square")
>>> spec.caption
'two red squares'
>>> parse_caption("two red squares")
{'count': 2, 'colour': 'red', 'shape': 'square'}
>>> image = render(spec, np.random.default_rng(0))
>>> image.shape, image.dtype
((32, 32, 3), dtype('uint8'))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4
MIN_GAP = 2  # pixels between shapes (after downsampling), so connected components never merge

# RGB values picked to be far apart in hue and all clearly visible on white.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 200, 0),
    "purple": (140, 40, 190),
    "orange": (250, 120, 0),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
# Words also accepted when parsing (never generated).
_COUNT_ALIASES: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
COUNTS: tuple[int, ...] = tuple(COUNT_WORDS)

# One unseen combination per shape, each with a different colour, so every colour and every shape is
# still seen in training (only the pairing is new).
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("blue", "triangle"), ("yellow", "circle"), ("purple", "square")}
)
ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOUR_NAMES for s in SHAPES)
TRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(cs for cs in ALL_COMBOS if cs not in HELDOUT_COMBOS)

# Every word a caption can contain (the model's tokenizer vocabulary).
VOCABULARY: tuple[str, ...] = (
    *dict.fromkeys(_COUNT_ALIASES),
    *COLOUR_NAMES,
    *SHAPES,
    *PLURALS.values(),
)


@dataclass(frozen=True)
class ShapeSpec:
    """What an image shows: ``count`` shapes of kind ``shape``, all of colour ``colour``."""

    count: int
    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.count not in COUNT_WORDS:
            raise ValueError(f"count must be one of {COUNTS}, got {self.count}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {COLOUR_NAMES}, got {self.colour!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")

    @property
    def caption(self) -> str:
        """The caption, e.g. ``"a red circle"`` or ``"three blue triangles"``."""
        return make_caption(self.count, self.colour, self.shape)

    def as_dict(self) -> dict[str, Any]:
        """``{"count": int, "colour": str, "shape": str}`` (the prompt metadata format)."""
        return {"count": self.count, "colour": self.colour, "shape": self.shape}


def make_caption(count: int, colour: str, shape: str) -> str:
    """Caption for ``count`` shapes of one colour and kind.

    >>> make_caption(1, "green", "triangle"), make_caption(4, "orange", "circle")
    ('a green triangle', 'four orange circles')
    """
    noun = shape if count == 1 else PLURALS[shape]
    return f"{COUNT_WORDS[count]} {colour} {noun}"


def parse_caption(text: str) -> dict[str, Any]:
    """Read the count, colour and shape named in a caption or prompt.

    Unknown words are ignored; an attribute the text does not name is ``None``. Plural nouns without a
    count word ("red circles") leave the count ``None``.

    Args:
        text: A caption such as ``"three blue triangles"``.

    Returns:
        ``{"count": int | None, "colour": str | None, "shape": str | None}``.

    >>> parse_caption("Three blue triangles.")
    {'count': 3, 'colour': 'blue', 'shape': 'triangle'}
    >>> parse_caption("an orange thing")
    {'count': 1, 'colour': 'orange', 'shape': None}
    """
    out: dict[str, Any] = {"count": None, "colour": None, "shape": None}
    singular = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
    for raw in text.lower().replace(",", " ").replace(".", " ").split():
        if raw in _COUNT_ALIASES and out["count"] is None:
            out["count"] = _COUNT_ALIASES[raw]
        elif raw in COLOURS and out["colour"] is None:
            out["colour"] = raw
        elif raw in singular and out["shape"] is None:
            out["shape"] = singular[raw]
    return out


def all_specs(combos: tuple[tuple[str, str], ...] | None = None) -> list[ShapeSpec]:
    """Every spec (count × colour × shape) over ``combos`` (default: all combinations), in a fixed order."""
    combos = ALL_COMBOS if combos is None else combos
    return [ShapeSpec(n, c, s) for c, s in combos for n in COUNTS]


def sample_spec(rng: np.random.Generator, combos: tuple[tuple[str, str], ...] | None = None) -> ShapeSpec:
    """Draw a spec uniformly: a colour–shape pair from ``combos`` (default: all) and a count 1–4."""
    combos = ALL_COMBOS if combos is None else combos
    colour, shape = combos[int(rng.integers(len(combos)))]
    return ShapeSpec(int(rng.integers(1, 5)), colour, shape)


def _size_range(count: int, size: int) -> tuple[float, float]:
    # Fewer shapes may be bigger; four shapes must still fit with gaps in a 32×32 canvas.
    frac = {1: (0.35, 0.55), 2: (0.25, 0.38), 3: (0.22, 0.32), 4: (0.20, 0.28)}[count]
    return frac[0] * size, frac[1] * size


def _layout(count: int, rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """Non-overlapping ``(cx, cy, side)`` boxes; retries with smaller shapes if a layout doesn't fit."""
    lo, hi = _size_range(count, size)
    margin = 1.0
    for attempt in range(200):
        shrink = 1.0 - 0.002 * attempt
        boxes: list[tuple[float, float, float]] = []
        for _ in range(count):
            for _try in range(100):
                side = rng.uniform(lo, hi) * shrink
                half = side / 2
                cx = rng.uniform(margin + half, size - margin - half)
                cy = rng.uniform(margin + half, size - margin - half)
                # Boxes (not circles) must be apart, since squares fill their whole box.
                if all(
                    max(abs(cx - bx) - (half + bs / 2), abs(cy - by) - (half + bs / 2)) >= MIN_GAP
                    for bx, by, bs in boxes
                ):
                    boxes.append((cx, cy, side))
                    break
            else:
                break
        if len(boxes) == count:
            return boxes
    raise RuntimeError(f"could not place {count} shapes in a {size}x{size} image")  # pragma: no cover


def render(spec: ShapeSpec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw ``spec`` with a random layout and random sizes.

    Args:
        spec: What to draw.
        rng: Source of the layout (same generator state, same image).
        size: Side of the square image in pixels.

    Returns:
        ``uint8`` array ``(size, size, 3)``.
    """
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    colour = COLOURS[spec.colour]
    for cx, cy, side in _layout(spec.count, rng, size):
        x0, y0 = (cx - side / 2) * SUPERSAMPLE, (cy - side / 2) * SUPERSAMPLE
        x1, y1 = (cx + side / 2) * SUPERSAMPLE, (cy + side / 2) * SUPERSAMPLE
        if spec.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif spec.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:  # upright isosceles triangle filling its box
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def make_dataset(
    n: int,
    seed: int,
    combos: tuple[tuple[str, str], ...] | None = None,
    size: int = IMAGE_SIZE,
) -> tuple[np.ndarray, list[ShapeSpec]]:
    """``n`` random images with their specs, deterministic in ``seed``.

    Args:
        n: Number of images.
        seed: Seed of the NumPy generator drawing specs and layouts.
        combos: Colour–shape pairs to draw from (default: all; :data:`TRAIN_COMBOS` for the generator).
        size: Image side in pixels.

    Returns:
        ``uint8`` images ``(n, size, size, 3)`` and the ``n`` specs.

    >>> a, specs = make_dataset(4, seed=1)
    >>> b, _ = make_dataset(4, seed=1)
    >>> bool((a == b).all()), len(specs)
    (True, 4)
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    specs = []
    for i in range(n):
        spec = sample_spec(rng, combos)
        images[i] = render(spec, rng, size)
        specs.append(spec)
    return images, specs


__all__ = [
    "ALL_COMBOS",
    "BACKGROUND",
    "COLOURS",
    "COLOUR_NAMES",
    "COUNTS",
    "COUNT_WORDS",
    "HELDOUT_COMBOS",
    "IMAGE_SIZE",
    "PLURALS",
    "SHAPES",
    "TRAIN_COMBOS",
    "VOCABULARY",
    "ShapeSpec",
    "all_specs",
    "make_caption",
    "make_dataset",
    "parse_caption",
    "render",
    "sample_spec",
]
