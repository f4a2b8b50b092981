"""The ``imagereward`` reward: ImageReward v1.0 (Xu et al., 2023), a BLIP reward model trained on human rankings.

    h = BERT_xattn(c | ViT(x_0))[CLS],   score(x_0, c) = (MLP(h) - μ) / σ

- ``ViT``: BLIP's ViT-L/16 at 224² (width 1024, 24 layers, 16 heads, LayerNorm eps 1e-6), all its output
  tokens (after the final LayerNorm) are the keys of the text encoder's cross-attention.
- ``BERT_xattn``: BLIP's "MED" BERT-base text encoder with a cross-attention block in every layer
  (``med_config.json``), read at the prompt's first token ([CLS]); the prompt is tokenized by
  ``bert-base-uncased``'s tokenizer with BLIP's two added tokens ([DEC] as BOS, [ENC]; vocabulary 30524),
  ``padding="max_length"``, ``max_length=35``, truncated.
- ``MLP``: ``Linear 768→1024→128→64→16→1`` (the LAION aesthetic head's shape,
  :class:`~diffusion_mdp.rewards.aesthetic.AestheticMLP`); μ = 0.16717362830052426, σ = 1.0333394966054072,
  the package's constants.
- Preprocessing: the package's ``Resize(224, BICUBIC)`` on the PIL image, ``CenterCrop(224)``, ``ToTensor``,
  CLIP mean/std: :func:`~diffusion_mdp.rewards.aesthetic.clip_preprocess` with torchvision's crop offset.

The two towers are transformers' ``BlipVisionModel`` and ``BlipTextModel``, whose modules are BLIP's
(``BlipTextModel`` is a copy of BLIP's ``med.py``); :func:`imagereward_to_transformers` renames the
checkpoint's vision keys (``blip.visual_encoder.blocks.N.attn.qkv`` -> ``encoder.layers.N.self_attn.qkv``,
…) as transformers' BLIP conversion does; the text keys are the same names.

Weights: ``ImageReward.pt`` and ``med_config.json`` from the hub repository ``THUDM/ImageReward`` and the
``bert-base-uncased`` tokenizer, from paths, the local Hugging Face cache or the hub.

Why not the ``image-reward`` package (1.5): it does not import with transformers 5 (its ``med.py`` imports
``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices`` and ``prune_linear_layer`` from
``transformers.modeling_utils``, which no longer has them), it pins ``timm==0.6.13`` and ``fairscale==0.4.13``
and pulls ``datasets`` and torchvision (a PyPI torchvision does not load beside this project's CPU torch), its
``import ImageReward`` imports its ReFL training script (diffusers, datasets, accelerate), and ``load()``
fetches ``med_config.json`` and the ``bert-base-uncased`` tokenizer from the hub unless told otherwise.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffusion_mdp.rewards import register_reward
from diffusion_mdp.rewards.aesthetic import (
    AestheticMLP,
    clip_preprocess,
    default_device,
    hub_file,
)
from diffusion_mdp.rewards.alignment import _from_pretrained

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILENAME = "ImageReward.pt"
MED_CONFIG_FILENAME = "med_config.json"
DEFAULT_IMAGEREWARD_TOKENIZER = "bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35

# BLIP vit.py name -> transformers BlipVisionModel name, inside one block
_BLOCK_RENAMES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VISION_RENAMES = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}


def _vision_key(key: str) -> str:
    if key in _VISION_RENAMES:
        return _VISION_RENAMES[key]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if match is None or match.group(2) not in _BLOCK_RENAMES:
        raise KeyError(f"blip.visual_encoder.{key}")
    return f"encoder.layers.{match.group(1)}.{_BLOCK_RENAMES[match.group(2)]}.{match.group(3)}"


def imagereward_to_transformers(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split an ``ImageReward.pt`` state dict into ``{"vision", "text", "mlp"}`` state dicts of our modules.

    ``blip.visual_encoder.*`` is renamed for ``BlipVisionModel``, ``blip.text_encoder.*`` keeps its names
    (``BlipTextModel``'s), ``mlp.*`` is the head's. BLIP's contrastive projections (``blip.vision_proj``,
    ``blip.text_proj``), unused by the score, and ``position_ids`` buffers are dropped.

    Raises:
        KeyError: A vision key has no counterpart (the checkpoint is not ImageReward's layout).
    """
    parts: dict[str, dict[str, Tensor]] = {"vision": {}, "text": {}, "mlp": {}}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("blip.visual_encoder."):
            parts["vision"][_vision_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder."):
            parts["text"][key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            parts["mlp"][key.removeprefix("mlp.")] = value
    return parts


def blip_configs(med_config: dict[str, Any], image_size: int = 224, vision_width: int = 1024) -> tuple[Any, Any]:
    """(``BlipVisionConfig``, ``BlipTextConfig``) of ImageReward: BLIP ViT-L/16 and the MED text encoder.

    Args:
        med_config: The contents of ``med_config.json`` (a BERT config with cross-attention).
        image_size, vision_width: BLIP's ``create_vit("large", 224)``: width 1024, 24 layers, 16 heads.
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=image_size,
        patch_size=16,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's vit.py: partial(nn.LayerNorm, eps=1e-6)
    )
    text = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        encoder_hidden_size=vision.hidden_size,  # BLIP sets encoder_width to the ViT's width
        is_decoder=True,  # builds the cross-attention blocks; forward(is_decoder=False) keeps attention bidirectional
    )
    return vision, text


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attention BERT + MLP head; ``forward(pixel_values, input_ids, attention_mask) -> (B,)``.

    Args:
        vision_config: A ``BlipVisionConfig``.
        text_config: A ``BlipTextConfig`` whose ``encoder_hidden_size`` is the ViT's width.
    """

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)
        self.image_size = int(vision_config.image_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, 3, S, S)`` pixels, ``(B, L)`` prompt tokens -> ``(B,)`` normalised rewards."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + (S/16)², D_v)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        ).last_hidden_state  # (B, L, D_t)
        return (self.mlp(hidden[:, 0].float()) - REWARD_MEAN) / REWARD_STD


def load_imagereward_model(
    checkpoint: str | os.PathLike[str] | None = None,
    med_config: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    vision_config: Any = None,
) -> ImageRewardModel:
    """ImageReward v1.0 from ``ImageReward.pt`` and ``med_config.json`` (paths, or the HF cache, then the hub).

    Args:
        checkpoint, med_config: Paths; None: from ``THUDM/ImageReward`` in the cache, then the hub.
        device, dtype: Where and in which precision the model runs (the head stays float32).
        vision_config: A ``BlipVisionConfig`` to use instead of BLIP ViT-L/16 (tests: a tiny one).

    Raises:
        RewardWeightsNotFoundError: A file is missing (the message names the repository and the file).
        ValueError: The checkpoint's tensors do not fit the architecture (names what is missing or extra).
    """
    config_path = hub_file(IMAGEREWARD_REPO, MED_CONFIG_FILENAME, med_config, purpose="the imagereward reward")
    path = hub_file(IMAGEREWARD_REPO, IMAGEREWARD_FILENAME, checkpoint, purpose="the imagereward reward")
    med = json.loads(Path(config_path).read_text())
    default_vision, text_config = blip_configs(med)
    vision_config = vision_config if vision_config is not None else default_vision
    text_config.encoder_hidden_size = vision_config.hidden_size
    try:
        parts = imagereward_to_transformers(torch.load(path, map_location="cpu", weights_only=True))
    except KeyError as exc:
        raise ValueError(f"{path} is not an ImageReward checkpoint (unknown tensor {exc})") from exc
    with torch.device("meta"):
        model = ImageRewardModel(vision_config, text_config)
    for name, module in (("vision", model.vision), ("text", model.text), ("mlp", model.mlp)):
        try:
            missing, unexpected = module.load_state_dict(parts[name], strict=False, assign=True)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"{path} does not fit ImageReward's {name} tower: {str(exc)[:300]}") from exc
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit ImageReward's {name} tower: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    for module in model.modules():  # non-persistent buffers (position_ids) stayed on the meta device
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                module.register_buffer(name, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device=device, dtype=dtype)
    model.mlp.float()
    return model.requires_grad_(False).eval()


def load_imagereward_tokenizer(name: str | os.PathLike[str] = DEFAULT_IMAGEREWARD_TOKENIZER) -> Any:
    """``bert-base-uncased``'s tokenizer with BLIP's additions (``init_tokenizer``): [DEC] as BOS, [ENC]."""
    from transformers import BertTokenizer

    tokenizer = _from_pretrained(BertTokenizer, name, "ImageReward tokenizer", "vocab.txt")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardScore:
    """``reward(images, prompts, metadata) -> (scores (B,), info)``: ImageReward of each image with its prompt.

    Args:
        checkpoint: Path of ``ImageReward.pt``, an :class:`ImageRewardModel` (tests pass tiny random ones), or
            None (``THUDM/ImageReward`` from the local Hugging Face cache, then the hub).
        med_config: Path of ``med_config.json`` (None: the same repository).
        tokenizer: Hub id, folder or tokenizer (``bert-base-uncased`` + BLIP's tokens; a tokenizer object is
            used as given).
        device, dtype: Where and in which precision the model runs.
        batch_size: Images per forward.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str] | nn.Module | None = None,
        med_config: str | os.PathLike[str] | None = None,
        tokenizer: Any = DEFAULT_IMAGEREWARD_TOKENIZER,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_imagereward_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        if isinstance(checkpoint, nn.Module):
            self.model = checkpoint.to(self.device, dtype).requires_grad_(False).eval()
            self.model.mlp.float()
        else:
            self.model = load_imagereward_model(checkpoint, med_config, self.device, dtype)
        self.dtype, self.batch_size = dtype, batch_size

    @torch.no_grad()
    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = []
        size = self.model.image_size
        for start in range(0, len(images), self.batch_size):
            pixels = clip_preprocess(images[start : start + self.batch_size], size, device=self.device, round_crop=True)
            tokens = self.tokenizer(
                list(prompts[start : start + self.batch_size]),
                padding="max_length",
                truncation=True,
                max_length=MAX_PROMPT_TOKENS,
                return_tensors="pt",
            ).to(self.device)
            scores.append(self.model(pixels.to(self.dtype), tokens["input_ids"], tokens["attention_mask"]))
        return torch.cat(scores).double().cpu().numpy(), {}


@register_reward("imagereward")
def imagereward(
    checkpoint: str | os.PathLike[str] | nn.Module | None = None,
    med_config: str | os.PathLike[str] | None = None,
    tokenizer: Any = DEFAULT_IMAGEREWARD_TOKENIZER,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> ImageRewardScore:
    """ImageReward v1.0 (``THUDM/ImageReward``); see :class:`ImageRewardScore`."""
    return ImageRewardScore(checkpoint, med_config, tokenizer, device, dtype, batch_size)


__all__ = [
    "ImageRewardModel",
    "ImageRewardScore",
    "blip_configs",
    "imagereward_to_transformers",
    "load_imagereward_model",
    "load_imagereward_tokenizer",
]
