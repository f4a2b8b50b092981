"""The ``pickscore`` reward: PickScore (Kirstain et al., 2023), a CLIP-H fine-tuned on Pick-a-Pic preferences.

    score(x_0, c) = exp(t) · cos(E_img(x_0), E_txt(c))

- ``E_img``, ``E_txt``: the projected image and text embeddings of ``yuvalkirstain/PickScore_v1``, a
  transformers ``CLIPModel`` (ViT-H/14, 1024-d projections); ``t`` is its learnt ``logit_scale``
  (exp(t) ≈ 100), so scores lie around 18-24 for ordinary samples.
- The processor is ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s (the model card's): ``CLIPImageProcessor``
  (shortest side to 224 with PIL's bicubic filter, center crop 224, CLIP mean/std), computed here batched
  on the scorer's device by :func:`~diffusion_mdp.rewards.aesthetic.clip_preprocess` with the sizes and
  statistics read from the processor; the prompt through its ``CLIPTokenizer``, ``padding=True``,
  ``truncation=True``, ``max_length=77``, as the model card's ``calc_probs``.
- Each image is scored against its own prompt (the diagonal of the model card's ``text_embs @ image_embs.T``).
  Flow-GRPO divides the score by 26 to train on it; pass ``scale=1 / 26`` for that.

Weights come from a folder, the local Hugging Face cache or the hub (in that order); missing ones raise
:class:`~diffusion_mdp.rewards.aesthetic.RewardWeightsNotFoundError` naming the model id and the
``huggingface-cli download`` command that fetches it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from diffusion_mdp.rewards import register_reward
from diffusion_mdp.rewards.aesthetic import (
    clip_preprocess,
    default_device,
    image_embeddings,
    load_clip,
    text_embeddings,
)
from diffusion_mdp.rewards.alignment import _from_pretrained

DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _processor_sizes(image_processor: Any) -> tuple[int, int]:
    """(resize shortest edge, crop side) of a ``CLIPImageProcessor`` (int, dict or ``SizeDict`` configs)."""
    size = image_processor.size
    crop = image_processor.crop_size
    short = int(size if isinstance(size, int) else size["shortest_edge"])
    side = int(crop if isinstance(crop, int) else crop["height"])
    return short, side


class PickScore:
    """``reward(images, prompts, metadata) -> (scores (B,), info)``: PickScore of each image with its prompt.

    Args:
        model: Hub id, folder, or a ``CLIPModel`` instance (tests pass tiny random ones).
        processor: Hub id, folder, or a ``CLIPProcessor`` (anything with ``image_processor`` and ``tokenizer``).
        scale: Multiplier of the score (1: PickScore as published; Flow-GRPO trains on 1/26).
        device: Where the model runs (default: the current CUDA device, else CPU).
        dtype: The model's weight dtype (float16 halves its 3.9 GB on GPU).
        batch_size: Images per forward.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | nn.Module = DEFAULT_PICKSCORE_MODEL,
        processor: Any = DEFAULT_PICKSCORE_PROCESSOR,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoProcessor

        self.device = torch.device(device) if device is not None else default_device()
        if isinstance(processor, (str, os.PathLike)):
            files = "preprocessor_config.json and the tokenizer files (vocab.json, merges.txt)"
            processor = _from_pretrained(AutoProcessor, processor, "PickScore processor", files)
        self.processor = processor
        self.size, self.crop_size = _processor_sizes(processor.image_processor)
        self.mean = tuple(processor.image_processor.image_mean)
        self.std = tuple(processor.image_processor.image_std)
        self.model = load_clip(model, self.device, dtype, purpose="the pickscore reward")
        self.scale, self.dtype, self.batch_size = float(scale), dtype, batch_size

    @torch.no_grad()
    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = []
        logit_scale = self.model.logit_scale.exp().float()
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            pixels = clip_preprocess(batch, self.size, self.crop_size, self.mean, self.std, device=self.device)
            image = nn.functional.normalize(image_embeddings(self.model, pixels.to(self.dtype)).float(), dim=-1)
            tokens = self.processor.tokenizer(
                list(prompts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=77,
                return_tensors="pt",
            ).to(self.device)
            text = text_embeddings(self.model, tokens["input_ids"], tokens["attention_mask"]).float()
            text = nn.functional.normalize(text, dim=-1)
            scores.append(logit_scale * (image * text).sum(-1))  # (b,): diag of text_embs @ image_embs.T
        return self.scale * torch.cat(scores).double().cpu().numpy(), {}


@register_reward("pickscore")
def pickscore(
    model: str | os.PathLike[str] | nn.Module = DEFAULT_PICKSCORE_MODEL,
    processor: Any = DEFAULT_PICKSCORE_PROCESSOR,
    scale: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> PickScore:
    """PickScore (``yuvalkirstain/PickScore_v1``); see :class:`PickScore`."""
    return PickScore(model, processor, scale, device, dtype, batch_size)


__all__ = ["DEFAULT_PICKSCORE_MODEL", "DEFAULT_PICKSCORE_PROCESSOR", "PickScore"]
