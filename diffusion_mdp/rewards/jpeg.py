"""JPEG (in)compressibility, the paper's first two rewards (DDPO, section 6.1).

The reward is the size of the image saved as JPEG at quality 95, in kilobytes (1 kB = 1000 bytes), with
a minus sign for compressibility. This is exactly the authors' definition: PIL's encoder, quality 95, size
of the encoded buffer divided by 1000.

>>> import numpy as np
>>> flat = np.full((1, 64, 64, 3), 128, np.uint8)
>>> noisy = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
>>> bool(jpeg_sizes_kb(noisy)[0] > jpeg_sizes_kb(flat)[0])
True
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from diffusion_mdp.rewards import register_reward

JPEG_QUALITY = 95


def jpeg_sizes_kb(images: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """JPEG-encoded size of each image in kB.

    Args:
        images: ``uint8`` array ``(B, H, W, 3)``.
        quality: PIL JPEG quality (the paper uses 95).

    Returns:
        ``float64`` array ``(B,)``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {images.shape}")
    sizes = np.empty(len(images), dtype=np.float64)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes[i] = buffer.tell() / 1000.0
    return sizes


def jpeg_incompressibility_reward(
    images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
) -> tuple[np.ndarray, dict[str, Any]]:
    """r(x_0, c) = JPEG size of x_0 in kB (larger files, higher reward)."""
    return jpeg_sizes_kb(images), {}


def jpeg_compressibility_reward(
    images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
) -> tuple[np.ndarray, dict[str, Any]]:
    """r(x_0, c) = -JPEG size of x_0 in kB (smaller files, higher reward)."""
    return -jpeg_sizes_kb(images), {}


@register_reward("jpeg_incompressibility")
def _make_incompressibility() -> Any:
    return jpeg_incompressibility_reward


@register_reward("jpeg_compressibility")
def _make_compressibility() -> Any:
    return jpeg_compressibility_reward
