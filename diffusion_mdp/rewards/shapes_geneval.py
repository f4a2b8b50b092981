"""A procedural object / count / colour / shape judge for tiny-shapes, in the spirit of GenEval.

GenEval (Ghosh et al. 2023) scores a text-to-image sample by *detecting* the objects in it and checking the
prompt's objects, counts and colours against the detections, instead of asking a captioner for a sentence.
The bundled world allows an exact detector: a tiny-shapes image is flat palette colours on white, so

1. every pixel ``p`` is explained as a mix ``p = α·c + (1 − α)·white`` of white and one palette colour
   ``c`` (the least-squares ``α`` per colour; the colour with the smallest residual wins, and ``α`` is
   its coverage);
2. the *objects* are the connected components (8-neighbourhood) of pixels with ``α ≥ 1/2``, and specks
   under :data:`MIN_OBJECT_AREA` pixels of coverage are ignored;
3. each object's colour is the coverage-weighted majority colour of its pixels, and its shape comes from
   two size-free numbers: its *fill ratio* ``A / (W·H)`` (coverage ``A`` over the box of its soft width
   ``W = Σ_x max_y α`` and height ``H = Σ_y max_x α``: 1 for a square, π/4 for a circle, 1/2 for a
   triangle) and its *skew*, how far below the middle of its rows its centre of mass lies, over ``H``
   (0 for a square or a circle, 1/6 for the upright triangles of the generator).

The verdict is GenEval's strict one: the image is right when it holds exactly the prompt's number of
objects and every one of them has the prompt's colour and shape (and its colour is clean: at least
:data:`MIN_PURITY` of its coverage is that colour). On fresh procedural images the detector reads count,
colour and shape exactly (``benchmarks/shapes_judge_check.py`` measures it); on generated samples it is
stricter than the CNN captioner, which reads a blotchy, two-coloured or merged sample as the nearest
caption.

Registered rewards:

- ``shapes_geneval``: 1 if the image is exactly the prompt (count, colour and shape), else 0.
- ``shapes_geneval_soft``: the fraction of the three checks passed (count, colour of every object, shape
  of every object), a denser signal with the same maximum.
- ``shapes_geneval_graded``: the strict verdict plus a quarter point each for colour and for shape held
  (0 … 1.5): the strict reward's count signal at full size, and a pull to keep colour and shape right in the
  samples whose count is wrong, where the strict reward says nothing about them.
- ``shapes_geneval_miss``: ``1 − shapes_geneval``, the sign-flipped control: an algorithm that learns from
  the reward moves accuracy *down* on it, one that merely drifts moves it the same way on both.

Each returns ``info`` with ``count_match``, ``colour_match``, ``shape_match`` and ``num_objects``.

>>> import numpy as np
>>> from diffusion_mdp.shapes.dataset import ShapeSpec, render
>>> image = render(ShapeSpec(3, "blue", "triangle"), np.random.default_rng(0))
>>> [(o.colour, o.shape) for o in detect_objects(image)]
[('blue', 'triangle'), ('blue', 'triangle'), ('blue', 'triangle')]
>>> judge_images(image[None], [{"count": 3, "colour": "blue", "shape": "triangle"}])["correct"].tolist()
[True]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusion_mdp.rewards import register_reward
from diffusion_mdp.shapes.dataset import BACKGROUND, COLOUR_NAMES, COLOURS

MIN_OBJECT_AREA = 4.0
"""Coverage (in pixels) below which a component is a speck, not an object (the smallest procedural shape
covers about 20 pixels)."""
MIN_PURITY = 0.75
"""Share of an object's coverage that its majority colour must have for the object to count as that colour."""
FILL_SQUARE_CIRCLE = 0.89
"""Fill ratio above which an object is a square (midway between a square's 1 and a circle's π/4)."""
FILL_CIRCLE_TRIANGLE = 0.64
"""Fill ratio below which an object is a triangle (midway between π/4 and 1/2)."""
SKEW_TRIANGLE = 0.06
"""Skew above which an object is a triangle (a triangle's is 1/6; small anti-aliased triangles fill up to
0.66 of their box, so the fill ratio alone misreads them as circles)."""

_WHITE = np.asarray(BACKGROUND, dtype=np.float64)
# (K, 3): each palette colour's offset from white, the direction along which anti-aliasing mixes.
_DIRS = np.stack([np.asarray(COLOURS[name], dtype=np.float64) - _WHITE for name in COLOUR_NAMES])
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass(frozen=True)
class DetectedObject:
    """One connected component of coloured pixels.

    Attributes:
        colour: Coverage-weighted majority palette colour.
        shape: ``"square"``, ``"circle"`` or ``"triangle"`` from the fill ratio.
        area: Coverage ``A = Σ α`` in pixels.
        fill: Fill ratio ``A / (W·H)`` of the soft bounding box.
        skew: Centre of mass below the middle of the occupied rows, over the height ``H``.
        purity: Share of the coverage whose pixels' best colour is ``colour``.
    """

    colour: str
    shape: str
    area: float
    fill: float
    skew: float
    purity: float


def _pixel_colours(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best palette colour and its coverage per pixel.

    Args:
        image: uint8 ``(H, W, 3)``.

    Returns:
        ``(H, W)`` int colour indices into :data:`COLOUR_NAMES` and ``(H, W)`` float coverage α in [0, 1].
    """
    off = image.astype(np.float64) - _WHITE  # (H, W, 3)
    # Least-squares α_k = <p − white, c_k − white> / |c_k − white|² for every palette colour k.
    alpha = np.clip(np.einsum("hwc,kc->hwk", off, _DIRS) / (_DIRS**2).sum(1), 0.0, 1.0)  # (H, W, K)
    residual = ((off[:, :, None, :] - alpha[..., None] * _DIRS) ** 2).sum(-1)  # (H, W, K)
    best = residual.argmin(-1)
    return best, np.take_along_axis(alpha, best[..., None], -1)[..., 0]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean ``(H, W)`` mask, each as an ``(n, 2)`` array of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(int(y0), int(x0))], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy, dx in _NEIGHBOURS:
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.asarray(pixels))
    return out


def _shape_of(fill: float, skew: float) -> str:
    if skew >= SKEW_TRIANGLE or fill < FILL_CIRCLE_TRIANGLE:
        return "triangle"
    if fill >= FILL_SQUARE_CIRCLE:
        return "square"
    return "circle"


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """The objects in one tiny-shapes image, in scan order (top to bottom).

    Args:
        image: uint8 ``(H, W, 3)``.

    Returns:
        One :class:`DetectedObject` per component with at least :data:`MIN_OBJECT_AREA` pixels of coverage.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}")
    best, alpha = _pixel_colours(image)
    objects = []
    for pixels in _components(alpha >= 0.5):
        ys, xs = pixels[:, 0], pixels[:, 1]
        # Grow the component by one pixel so its anti-aliased rim (α < 1/2) counts towards its coverage.
        y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, image.shape[0])
        x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, image.shape[1])
        core = np.zeros(alpha.shape, dtype=bool)
        core[ys, xs] = True
        grown = core.copy()
        for dy, dx in _NEIGHBOURS:
            grown |= np.roll(np.roll(core, dy, 0), dx, 1)
        region = np.zeros(alpha.shape, dtype=bool)
        region[y0:y1, x0:x1] = grown[y0:y1, x0:x1]
        a = np.where(region, alpha, 0.0)
        area = float(a.sum())
        if area < MIN_OBJECT_AREA:
            continue
        votes = np.bincount(best[region], weights=alpha[region], minlength=len(COLOUR_NAMES))
        colour = int(votes.argmax())
        rows = a.max(1)  # (H,) soft occupancy of each row
        width, height = float(a.max(0).sum()), float(rows.sum())
        fill = area / max(width * height, 1e-9)
        y = np.arange(len(rows), dtype=np.float64)
        skew = float(((y * a.sum(1)).sum() / area - (y * rows).sum() / height) / height)
        objects.append(
            DetectedObject(
                colour=COLOUR_NAMES[colour],
                shape=_shape_of(fill, skew),
                area=area,
                fill=fill,
                skew=skew,
                purity=float(votes[colour] / max(votes.sum(), 1e-9)),
            )
        )
    return objects


def judge_images(images: np.ndarray, wanted: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Check each image against the ``{"count", "colour", "shape"}`` it should show.

    Args:
        images: uint8 ``(B, H, W, 3)``.
        wanted: ``B`` dicts; an attribute that is ``None`` is not checked.

    Returns:
        ``{"correct", "count_match", "colour_match", "shape_match"}`` boolean ``(B,)`` arrays and
        ``"num_objects"`` int ``(B,)``. ``colour_match`` / ``shape_match`` need at least one object and
        every object right (colour also clean, purity ≥ :data:`MIN_PURITY`); ``correct`` needs all three.
    """
    images = np.asarray(images)
    if len(images) != len(wanted):
        raise ValueError(f"got {len(images)} images but {len(wanted)} prompt attribute dicts")
    out = {key: np.zeros(len(images), dtype=bool) for key in ("correct", "count_match", "colour_match", "shape_match")}
    out["num_objects"] = np.zeros(len(images), dtype=np.int64)
    for i, (image, want) in enumerate(zip(images, wanted, strict=True)):
        objects = detect_objects(image)
        out["num_objects"][i] = len(objects)
        count, colour, shape = want.get("count"), want.get("colour"), want.get("shape")
        out["count_match"][i] = count is None or len(objects) == count
        out["colour_match"][i] = bool(objects) and (
            colour is None or all(o.colour == colour and o.purity >= MIN_PURITY for o in objects)
        )
        out["shape_match"][i] = bool(objects) and (shape is None or all(o.shape == shape for o in objects))
        out["correct"][i] = out["count_match"][i] and out["colour_match"][i] and out["shape_match"][i]
    return out


def _judge(images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    from diffusion_mdp.rewards.shapes import prompt_attributes

    return judge_images(images, prompt_attributes(prompts, metadata))


def _info(verdict: dict[str, np.ndarray]) -> dict[str, Any]:
    return {key: verdict[key].astype(np.float64) for key in ("count_match", "colour_match", "shape_match",
                                                              "num_objects")}


def _verdict_reward(score: Callable[[dict[str, np.ndarray]], np.ndarray]) -> Any:
    """A reward that judges the images and turns the verdict into one number per image with ``score``."""

    def reward(
        images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        verdict = _judge(images, prompts, metadata)
        return score(verdict), _info(verdict)

    return reward


@register_reward("shapes_geneval")
def shapes_geneval():
    """Reward factory: 1 if the image holds exactly the prompt's count of objects, all of its colour and shape."""
    return _verdict_reward(lambda verdict: verdict["correct"].astype(np.float64))


@register_reward("shapes_geneval_soft")
def shapes_geneval_soft():
    """Reward factory: the fraction of the count, colour and shape checks an image passes (0, ⅓, ⅔ or 1)."""
    checks = ("count_match", "colour_match", "shape_match")
    return _verdict_reward(lambda verdict: np.stack([verdict[k] for k in checks]).astype(np.float64).mean(0))


@register_reward("shapes_geneval_graded")
def shapes_geneval_graded(attribute_weight: float = 0.25):
    """Reward factory: the strict verdict plus ``attribute_weight`` for each of colour and shape held.

    Args:
        attribute_weight: What a right colour, and a right shape, each add to the strict 0 / 1 (0 gives
            ``shapes_geneval``). Must be ≥ 0.
    """
    if attribute_weight < 0:
        raise ValueError(f"attribute_weight must be >= 0, got {attribute_weight}")

    def score(verdict: dict[str, np.ndarray]) -> np.ndarray:
        attributes = verdict["colour_match"].astype(np.float64) + verdict["shape_match"].astype(np.float64)
        return verdict["correct"].astype(np.float64) + attribute_weight * attributes

    return _verdict_reward(score)


@register_reward("shapes_geneval_miss")
def shapes_geneval_miss():
    """Reward factory: 1 if the image is *not* exactly the prompt (the sign-flipped ``shapes_geneval``)."""
    return _verdict_reward(lambda verdict: 1.0 - verdict["correct"].astype(np.float64))


__all__ = [
    "DetectedObject",
    "detect_objects",
    "judge_images",
    "shapes_geneval",
    "shapes_geneval_graded",
    "shapes_geneval_miss",
    "shapes_geneval_soft",
]
