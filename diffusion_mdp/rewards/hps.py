"""The ``hpsv2`` reward: Human Preference Score v2.1 (Wu et al., 2023), an open_clip ViT-H/14 fine-tuned on HPD v2.

    score(x_0, c) = cos(E_img(x_0), E_txt(c))

as the ``hpsv2`` package's ``score(..., hps_version="v2.1")``: the normalised image and text features'
dot product, no logit scale (scores lie around 0.2-0.35).

- Weights: ``HPS_v2.1_compressed.pt`` from the hub repository ``xswu/HPSv2`` (a dict whose ``"state_dict"``
  is an open_clip ``CLIP`` of architecture ``ViT-H-14``), from a path, the local Hugging Face cache or the
  hub. :func:`openclip_to_transformers` renames it to a transformers ``CLIPModel`` of the same architecture
  (:func:`vit_h_14_config`), the mapping of transformers' own open_clip conversion: the fused attention
  ``in_proj`` split into q/k/v, the projections transposed. The two architectures compute the same function
  (pre-LayerNorm transformers with exact GELU, class-token pooling after ``ln_post``, text pooled at the
  first end-of-text token behind a causal mask); ``tests/test_rewards_preference.py`` checks the mapping
  against an open_clip-layout reference written from open_clip's modules.
- Tokenizer: open_clip's ``SimpleTokenizer`` is OpenAI CLIP's BPE, 77 tokens; the ``CLIPTokenizer`` of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` holds the same vocabulary and truncates the same way (start token,
  75 tokens, end token); :meth:`HPSv2Score.tokenize` zero-pads as open_clip. The text is passed without an
  attention mask, as open_clip does: behind the causal mask the padding after the end token cannot reach it.
- Preprocessing: the package's evaluation transform — ``ToTensor`` (×1/255), then torchvision's tensor
  ``Resize(224, BICUBIC)`` (``F.interpolate(mode="bicubic", antialias=True)``, torchvision ≥ 0.17's
  default), ``CenterCrop(224)``, CLIP mean/std — done batched here (:func:`hps_preprocess`).

Why not the ``hpsv2`` package (1.2.0): it requires ``pytest==7.2.0`` and ``protobuf<4`` at run time (this
project's tests run on pytest 8), its ``score()`` first builds the model with ``pretrained="laion2B-s32B-b79K"``,
downloading the 3.9 GB base CLIP from the hub before loading the HPS weights over it, and it vendors an old
open_clip. ``open_clip_torch`` itself (3.3.0) needs torchvision, whose PyPI builds link CUDA libraries and
fail to load beside the CPU torch this project pins (and an installed torchvision breaks transformers' own
imports there), so the model is run through transformers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffusion_mdp.rewards import register_reward
from diffusion_mdp.rewards.aesthetic import (
    CLIP_MEAN,
    CLIP_STD,
    RewardWeightsNotFoundError,
    default_device,
    hub_file,
    image_embeddings,
    text_embeddings,
)
from diffusion_mdp.rewards.alignment import _from_pretrained

HPS_REPO = "xswu/HPSv2"
HPS_FILENAME = "HPS_v2.1_compressed.pt"
DEFAULT_HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def vit_h_14_config() -> Any:
    """open_clip's ``ViT-H-14.json`` as a transformers ``CLIPConfig``.

    Vision: 224², patch 14, width 1280, 32 layers, 16 heads (head width 80), MLP 5120. Text: 77 tokens,
    vocabulary 49408, width 1024, 24 layers, 16 heads, MLP 4096. Joint embedding 1024; exact GELU, LayerNorm
    eps 1e-5 (open_clip's defaults).
    """
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        projection_dim=1024,
    )


def _block_keys(src: str, dst: str, state: dict[str, Tensor], out: dict[str, Tensor]) -> None:
    """One open_clip ``ResidualAttentionBlock`` (``src``) -> one transformers ``CLIPEncoderLayer`` (``dst``)."""
    out[f"{dst}.layer_norm1.weight"] = state[f"{src}.ln_1.weight"]
    out[f"{dst}.layer_norm1.bias"] = state[f"{src}.ln_1.bias"]
    out[f"{dst}.layer_norm2.weight"] = state[f"{src}.ln_2.weight"]
    out[f"{dst}.layer_norm2.bias"] = state[f"{src}.ln_2.bias"]
    # nn.MultiheadAttention's fused in_proj: rows [0, W) query, [W, 2W) key, [2W, 3W) value
    for name, part in zip(("q", "k", "v"), state[f"{src}.attn.in_proj_weight"].chunk(3), strict=True):
        out[f"{dst}.self_attn.{name}_proj.weight"] = part
    for name, part in zip(("q", "k", "v"), state[f"{src}.attn.in_proj_bias"].chunk(3), strict=True):
        out[f"{dst}.self_attn.{name}_proj.bias"] = part
    out[f"{dst}.self_attn.out_proj.weight"] = state[f"{src}.attn.out_proj.weight"]
    out[f"{dst}.self_attn.out_proj.bias"] = state[f"{src}.attn.out_proj.bias"]
    out[f"{dst}.mlp.fc1.weight"] = state[f"{src}.mlp.c_fc.weight"]
    out[f"{dst}.mlp.fc1.bias"] = state[f"{src}.mlp.c_fc.bias"]
    out[f"{dst}.mlp.fc2.weight"] = state[f"{src}.mlp.c_proj.weight"]
    out[f"{dst}.mlp.fc2.bias"] = state[f"{src}.mlp.c_proj.bias"]


def _num_blocks(state: dict[str, Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def openclip_to_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an open_clip ``CLIP`` state dict (OpenAI layout) to a transformers ``CLIPModel``'s.

    A ``module.`` prefix (DDP checkpoints) is dropped; the causal ``attn_mask`` buffer, which transformers
    builds itself, is ignored.

    Raises:
        KeyError: A tensor the mapping needs is missing (the checkpoint is not an open_clip ViT CLIP).
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    # text tower
    out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
    for i in range(_num_blocks(state, "transformer.resblocks.")):
        _block_keys(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", state, out)
    out["text_model.final_layer_norm.weight"] = state["ln_final.weight"]
    out["text_model.final_layer_norm.bias"] = state["ln_final.bias"]
    out["text_projection.weight"] = state["text_projection"].T.contiguous()  # open_clip: x @ P, P (width, E)
    # vision tower
    out["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"]
    out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out["vision_model.pre_layrnorm.weight"] = state["visual.ln_pre.weight"]  # sic: transformers' name
    out["vision_model.pre_layrnorm.bias"] = state["visual.ln_pre.bias"]
    for i in range(_num_blocks(state, "visual.transformer.resblocks.")):
        _block_keys(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", state, out)
    out["vision_model.post_layernorm.weight"] = state["visual.ln_post.weight"]
    out["vision_model.post_layernorm.bias"] = state["visual.ln_post.bias"]
    out["visual_projection.weight"] = state["visual.proj"].T.contiguous()
    out["logit_scale"] = state["logit_scale"].reshape(())
    return out


def load_hps_model(
    checkpoint: str | os.PathLike[str] | None = None,
    config: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The HPS v2.1 model as a frozen transformers ``CLIPModel``.

    Args:
        checkpoint: Path of ``HPS_v2.1_compressed.pt``; None: the local Hugging Face cache, then the hub.
        config: The ``CLIPConfig`` of the checkpoint's architecture (:func:`vit_h_14_config` by default).
        device, dtype: Where and in which precision the model runs.

    Raises:
        RewardWeightsNotFoundError: The checkpoint is missing (the message names ``xswu/HPSv2`` and the file).
        ValueError: The checkpoint's tensors do not fit the architecture (names what is missing or extra).
    """
    from transformers import CLIPModel

    path = hub_file(HPS_REPO, HPS_FILENAME, checkpoint, purpose="the hpsv2 reward")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise RewardWeightsNotFoundError(f"{path} holds no state dict: expected {HPS_FILENAME} from {HPS_REPO}")
    try:
        converted = openclip_to_transformers(state)
    except KeyError as exc:
        raise ValueError(f"{path} is not an open_clip ViT CLIP checkpoint (no tensor {exc})") from exc
    with torch.device("meta"):
        model = CLIPModel(config if config is not None else vit_h_14_config())
    try:
        missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{path} does not fit the CLIP config: {str(exc)[:300]}") from exc
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers transformers rebuilds
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the CLIP config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for module in model.modules():  # position_ids buffers were left on the meta device
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                module.register_buffer(name, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    device = torch.device(device) if device is not None else default_device()
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()


def hps_preprocess(images: np.ndarray | Tensor, size: int = 224, device: torch.device | str | None = None) -> Tensor:
    """The ``hpsv2`` package's evaluation transform, batched: uint8 ``(B, H, W, 3)`` -> ``(B, 3, size, size)``.

    ``ToTensor`` (×1/255), shortest side to ``size`` by antialiased bicubic interpolation of the float
    tensor (torchvision's tensor ``Resize``; long side ``int(size · long / short)``), ``CenterCrop(size)``
    (offset ``round(excess / 2)``), CLIP mean/std.

    >>> hps_preprocess(np.full((1, 300, 200, 3), 255, np.uint8)).shape
    torch.Size([1, 3, 224, 224])
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.to(device) if device is not None else x
    x = x.permute(0, 3, 1, 2).float() / 255
    height, width = int(x.shape[2]), int(x.shape[3])
    short, long = min(height, width), max(height, width)
    if short != size:  # torchvision returns the image unchanged when the short side is already `size`
        new_long = int(size * long / short)
        new_hw = (size, new_long) if height <= width else (new_long, size)
        x = nn.functional.interpolate(x, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
    new_h, new_w = int(x.shape[2]), int(x.shape[3])
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    x = x[:, :, top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class HPSv2Score:
    """``reward(images, prompts, metadata) -> (scores (B,), info)``: HPS v2.1 of each image with its prompt.

    Args:
        checkpoint: Path of ``HPS_v2.1_compressed.pt``, a loaded ``CLIPModel`` (tests pass tiny random ones),
            or None (the local Hugging Face cache, then the hub).
        tokenizer: Hub id, folder or ``CLIPTokenizer`` (OpenAI CLIP's BPE, 77 tokens). One passed as an object
            is used as given: "!" must not be among its special tokens (open_clip keeps "!!" one token).
        device, dtype: Where and in which precision the model runs.
        batch_size: Images per forward.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str] | nn.Module | None = None,
        tokenizer: Any = DEFAULT_HPS_TOKENIZER,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        from transformers import CLIPTokenizer

        self.device = torch.device(device) if device is not None else default_device()
        if isinstance(tokenizer, (str, os.PathLike)):
            # laion's tokenizer declares "!" (id 0) its pad token, which would make "!" a special token that splits
            # "!!" apart; open_clip pads with id 0 without such a token, so pad (unused: see tokenize) with the end.
            files = "vocab.json and merges.txt"
            tokenizer = _from_pretrained(CLIPTokenizer, tokenizer, "HPS tokenizer", files, pad_token="<|endoftext|>")
        self.tokenizer = tokenizer
        if isinstance(checkpoint, nn.Module):
            self.model = checkpoint.to(self.device, dtype).requires_grad_(False).eval()
        else:
            self.model = load_hps_model(checkpoint, device=self.device, dtype=dtype)
        config = self.model.config
        self.image_size = int(config.vision_config.image_size)
        self.context_length = int(config.text_config.max_position_embeddings)
        self.dtype, self.batch_size = dtype, batch_size

    def tokenize(self, prompts: list[str]) -> Tensor:
        """open_clip's token tensor: ``(B, context_length)`` int64, start + ≤ 75 tokens + end, zero-padded."""
        rows = self.tokenizer(list(prompts), truncation=True, max_length=self.context_length)["input_ids"]
        ids = torch.zeros(len(rows), self.context_length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids

    @torch.no_grad()
    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = []
        for start in range(0, len(images), self.batch_size):
            pixels = hps_preprocess(images[start : start + self.batch_size], self.image_size, self.device)
            image = nn.functional.normalize(image_embeddings(self.model, pixels.to(self.dtype)).float(), dim=-1)
            ids = self.tokenize(prompts[start : start + self.batch_size]).to(self.device)
            text = text_embeddings(self.model, ids).float()  # no attention mask, as open_clip
            scores.append((image * nn.functional.normalize(text, dim=-1)).sum(-1))
        return torch.cat(scores).double().cpu().numpy(), {}


@register_reward("hpsv2")
def hpsv2(
    checkpoint: str | os.PathLike[str] | nn.Module | None = None,
    tokenizer: Any = DEFAULT_HPS_TOKENIZER,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> HPSv2Score:
    """Human Preference Score v2.1 (``xswu/HPSv2``, ``HPS_v2.1_compressed.pt``); see :class:`HPSv2Score`."""
    return HPSv2Score(checkpoint, tokenizer, device, dtype, batch_size)


__all__ = ["HPSv2Score", "hps_preprocess", "load_hps_model", "openclip_to_transformers", "vit_h_14_config"]
