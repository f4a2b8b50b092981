"""Prompt-alignment rewards for tiny-shapes: the miniature of the paper's LLaVA + BERTScore reward.

In DDPO's prompt-alignment experiment (section 6.3) a VLM captions the sample and BERTScore compares the
caption with the prompt. Here the bundled :class:`~diffusion_mdp.shapes.captioner.Captioner` reads the
count, colour and shape of the sample, and the prompt's attributes come from the prompt set's metadata
(``{"count", "colour", "shape"}``) or, without it, from :func:`~diffusion_mdp.shapes.dataset.parse_caption`.

- ``prompt_alignment``: the *soft* fraction of matched attributes,
  ``r = mean_a P_captioner(a = prompt's a | image)`` over the attributes the prompt names. It equals the
  expected fraction of attributes matched by a caption drawn from the captioner's belief, so it is exactly
  the hard "fraction of matched attributes" when the captioner is certain, and it moves smoothly as a
  sample drifts towards the right colour or count: a dense signal for the policy gradient, like BERTScore
  is between captions. Pass ``soft=False`` for the hard fraction (0, 1/3, 2/3 or 1).
- ``strict_alignment``: 1 if the captioner's most likely count, colour and shape all match, else 0.

Both return ``info`` with the hard per-attribute matches (``count_match``, ``colour_match``,
``shape_match``) for logging.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from diffusion_mdp.rewards import register_reward
from diffusion_mdp.shapes.captioner import ATTRIBUTES, Captioner
from diffusion_mdp.shapes.dataset import parse_caption


@functools.lru_cache(maxsize=4)
def _captioner(device: str) -> Captioner:
    # Loaded once per device and shared by every reward built in this process.
    return Captioner.load(device=device)


def prompt_attributes(prompts: list[str], metadata: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Requested ``{"count", "colour", "shape"}`` per prompt: metadata when it has them, else parsed text.

    >>> prompt_attributes(["two red squares"], [{}])
    [{'count': 2, 'colour': 'red', 'shape': 'square'}]
    """
    metadata = metadata if metadata else [{} for _ in prompts]
    out = []
    for prompt, meta in zip(prompts, metadata, strict=True):
        if all(meta.get(k) is not None for k in ATTRIBUTES):
            out.append({k: meta[k] for k in ATTRIBUTES})
        else:
            parsed = parse_caption(prompt)
            out.append({k: meta.get(k, parsed[k]) if meta.get(k) is not None else parsed[k] for k in ATTRIBUTES})
        if all(v is None for v in out[-1].values()):
            raise ValueError(
                f"prompt {prompt!r} names no count, colour or shape the tiny-shapes captioner knows; "
                "use a shapes_* prompt set or give metadata {'count', 'colour', 'shape'}"
            )
    return out


def _scores(
    captioner: Captioner, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Per-attribute probability of the requested value, hard match, and a mask of named attributes."""
    wanted = prompt_attributes(prompts, metadata)
    probs = captioner.probabilities(images)
    n, k = len(images), len(ATTRIBUTES)
    soft, hard, named = np.zeros((n, k)), np.zeros((n, k)), np.zeros((n, k), dtype=bool)
    for j, (name, values) in enumerate(ATTRIBUTES.items()):
        best = probs[name].argmax(-1)
        for i in range(n):
            value = wanted[i][name]
            if value is None:
                continue
            if value not in values:
                raise ValueError(f"{name} {value!r} is not one of {values}")
            col = values.index(value)
            named[i, j] = True
            soft[i, j] = probs[name][i, col]
            hard[i, j] = float(best[i] == col)
    info = {f"{name}_match": hard[:, j] for j, name in enumerate(ATTRIBUTES)}
    return soft, hard, named, info


@register_reward("prompt_alignment")
def prompt_alignment(soft: bool = True, device: str = "cpu"):
    """Reward factory: (soft) fraction of the prompt's attributes the captioner finds in the image.

    Args:
        soft: Use the captioner's probabilities (dense, default) instead of its argmax.
        device: Where the captioner runs.
    """

    def reward(
        images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        soft_scores, hard, named, info = _scores(_captioner(str(device)), images, prompts, metadata)
        values = soft_scores if soft else hard
        rewards = (values * named).sum(1) / named.sum(1)
        info["matched_fraction"] = (hard * named).sum(1) / named.sum(1)
        return rewards, info

    return reward


@register_reward("strict_alignment")
def strict_alignment(device: str = "cpu"):
    """Reward factory: 1 if every attribute the prompt names matches the captioner's reading, else 0.

    Args:
        device: Where the captioner runs.
    """

    def reward(
        images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        _, hard, named, info = _scores(_captioner(str(device)), images, prompts, metadata)
        rewards = np.all((hard == 1) | ~named, axis=1).astype(np.float64)
        return rewards, info

    return reward
