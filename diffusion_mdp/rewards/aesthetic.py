"""The ``aesthetic`` reward: the LAION aesthetic predictor (DDPO, section 6.2), as published.

    score(x_0) = MLP(e / ‖e‖₂),   e = CLIP ViT-L/14 image embedding of x_0

- The CLIP model is ``openai/clip-vit-large-patch14`` by default (from the local Hugging Face cache, the hub,
  or a folder passed as ``clip_model=``); its projected image embedding (``CLIPModel.get_image_features``)
  is L2-normalised, as in the predictor's ``simple_inference.py``.
- The head is ``sac+logos+ava1-l14-linearMSE.pth`` from christophschuhmann/improved-aesthetic-predictor,
  shipped in ``diffusion_mdp/data/aesthetic/`` (see its README for source, licence and sha256): a
  ``Linear 768→1024→128→64→16→1`` MLP with dropout between the first four layers (inactive at eval).
- Preprocessing is CLIP's (``CLIPImageProcessor``): resize the shortest side to 224 with PIL's bicubic
  filter, center crop 224×224, rescale by 1/255, normalise with CLIP's mean/std. :func:`clip_preprocess`
  does it batched in torch on the scorer's device, bit-exactly: PIL's separable bicubic resampling (a = -0.5,
  antialiased, 22-bit fixed-point coefficients, uint8 rounding after each pass) is two matrix products whose
  integer arithmetic float64 represents exactly. ``tests/test_real_scale_rewards.py`` checks it against
  transformers' processor.

Nothing falls back silently: a missing CLIP model or head raises :class:`RewardWeightsNotFoundError` naming
the files and where to put them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffusion_mdp.rewards import register_reward

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
HEAD_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit resampling (Resample.c)


class RewardWeightsNotFoundError(OSError):
    """A reward model's weights are neither where they were asked for nor in the local cache."""


def default_device() -> torch.device:
    """The current CUDA device if there is one (the policy's, under multi-GPU launchers), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# CLIP preprocessing, batched and on device, equal to CLIPImageProcessor's PIL path
# ------------------------------------------------------------------------------------------------
def _pil_bicubic(x: float) -> float:
    # PIL's bicubic kernel (Resample.c, a = -0.5), not torch's (a = -0.75).
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=64)
def pil_bicubic_matrix(in_size: int, out_size: int) -> Tensor:
    """PIL's fixed-point bicubic resampling weights as an ``(out_size, in_size)`` float64 matrix.

    Entries are the integer coefficients PIL uses (``round(k · 2²²)``), so ``floor((W @ x + 2²¹) / 2²²)``
    clipped to [0, 255] is PIL's ``Image.resize(..., BICUBIC)`` along one axis, exactly.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        k = np.array([_pil_bicubic((x - center + 0.5) / filterscale) for x in range(xmin, xmax)])
        total = k.sum()
        if total != 0:
            k = k / total
        # (int)(±0.5 + k · 2^22): C truncation towards zero of the rounded value
        fixed = np.trunc(np.where(k < 0, -0.5, 0.5) + k * (1 << _PIL_PRECISION_BITS))
        weights[xx, xmin:xmax] = fixed
    return torch.from_numpy(weights)


def _resample_pil(x: Tensor, matrix: Tensor, dim: int) -> Tensor:
    """One PIL bicubic pass along ``dim`` (-1: width, -2: height) of a float64 uint8-valued tensor."""
    # Exact in float64: |pixel · coefficient| < 2^8 · 2^23 and a row sums < 2^13 of them, all below 2^53.
    out = torch.matmul(x, matrix.T) if dim == -1 else torch.matmul(matrix, x)
    out = torch.floor((out + (1 << (_PIL_PRECISION_BITS - 1))) / (1 << _PIL_PRECISION_BITS))
    return out.clamp_(0, 255)


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(H, W) after resizing the shortest side to ``shortest_edge`` (transformers' rounding: ``int()``)."""
    if height <= width:
        return shortest_edge, int(shortest_edge * width / height)
    return int(shortest_edge * height / width), shortest_edge


def clip_preprocess(
    images: np.ndarray | Tensor,
    size: int = 224,
    crop_size: int | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    device: torch.device | str | None = None,
    round_crop: bool = False,
) -> Tensor:
    """CLIPImageProcessor's preprocessing, batched in torch.

    Args:
        images: ``uint8`` ``(B, H, W, 3)`` (NumPy or torch).
        size: The shortest side after resizing (224 for ViT-L/14).
        crop_size: Side of the center crop (``size`` by default).
        mean, std: Per-channel normalisation.
        device: Where to compute (the images' device by default).
        round_crop: Place the crop as torchvision's ``CenterCrop`` (offset ``round(excess / 2)``) instead of
            CLIPImageProcessor's ``excess // 2``; they differ only for an odd excess.

    Returns:
        ``float32`` ``(B, 3, crop_size, crop_size)`` pixel values, equal to
        ``CLIPImageProcessor()(images=list(images)).pixel_values`` (PIL path) up to float32 rounding.
    """
    crop_size = crop_size or size
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.to(device) if device is not None else x
    height, width = int(x.shape[1]), int(x.shape[2])
    new_h, new_w = resize_output_size(height, width, size)
    x = x.permute(0, 3, 1, 2).to(torch.float64)  # (B, 3, H, W), integer values
    # PIL resizes horizontally first, then vertically, rounding to uint8 in between.
    if new_w != width:
        x = _resample_pil(x, pil_bicubic_matrix(width, new_w).to(x.device), dim=-1)
    if new_h != height:
        x = _resample_pil(x, pil_bicubic_matrix(height, new_h).to(x.device), dim=-2)
    if round_crop:  # Python's round (half to even), as torchvision.transforms.functional.center_crop
        top, left = round((new_h - crop_size) / 2.0), round((new_w - crop_size) / 2.0)
    else:
        top, left = (new_h - crop_size) // 2, (new_w - crop_size) // 2
    if top < 0 or left < 0:
        raise ValueError(f"crop {crop_size} larger than the resized image {new_h}×{new_w}")
    x = x[:, :, top : top + crop_size, left : left + crop_size].to(torch.float32) * (1 / 255)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


# ------------------------------------------------------------------------------------------------
# CLIP loading (shared with clip_score)
# ------------------------------------------------------------------------------------------------
def load_clip(
    clip_model: str | os.PathLike[str] | nn.Module = DEFAULT_CLIP_MODEL,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    purpose: str = "the aesthetic reward",
) -> nn.Module:
    """A frozen ``CLIPModel`` from a module, a folder, the local HF cache, or the hub (in that order).

    Raises:
        RewardWeightsNotFoundError: Neither a folder nor cached, and the hub is unreachable; the message names
            the model id, the files needed and where to put them.
    """
    from transformers import CLIPModel

    device = torch.device(device) if device is not None else default_device()
    if isinstance(clip_model, nn.Module):
        model = clip_model
    else:
        name = os.fspath(clip_model)
        path = Path(name).expanduser()
        if name.startswith((".", "/", "~")) and not path.is_dir():
            raise RewardWeightsNotFoundError(
                f"CLIP model folder {path} (for {purpose}) does not exist: it should hold config.json and "
                "model.safetensors (or pytorch_model.bin) of a transformers CLIPModel, as written by "
                "CLIPModel.from_pretrained(...).save_pretrained(folder)"
            )
        error: Exception | None = None
        model = None
        for local_only in (True, False):  # cache first, then the hub
            try:
                model = CLIPModel.from_pretrained(name, local_files_only=local_only, dtype=dtype)
                break
            except (OSError, ValueError) as exc:
                error = exc
        if model is None:
            raise RewardWeightsNotFoundError(
                f"CLIP model {name!r} (for {purpose}) is not in the local Hugging Face cache and could not be "
                f"downloaded ({type(error).__name__}). It needs config.json and model.safetensors (or "
                f"pytorch_model.bin) of a transformers CLIPModel. On a machine with access run "
                f"`huggingface-cli download {name} config.json model.safetensors` and copy ~/.cache/huggingface, "
                "or save the model to a folder and pass clip_model=<folder>."
            ) from error
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()


def hub_file(
    repo_id: str,
    filename: str,
    path: str | os.PathLike[str] | None = None,
    *,
    purpose: str,
) -> Path:
    """One weights file: ``path`` if given, else from the local Hugging Face cache, else from the hub.

    Raises:
        RewardWeightsNotFoundError: ``path`` does not exist, or the file is neither cached nor downloadable; the
            message names the repository, the file and the command that fetches it.
    """
    fetch = (
        f"On a machine with access run `huggingface-cli download {repo_id} {filename}` and copy "
        f"~/.cache/huggingface, or pass the file's path."
    )
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise RewardWeightsNotFoundError(
                f"{file} (for {purpose}) does not exist: it should be {filename} from {repo_id}. {fetch}"
            )
        return file
    from huggingface_hub import hf_hub_download

    error: Exception | None = None
    for local_only in (True, False):  # cache first, then the hub
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=local_only))
        except Exception as exc:  # offline, unknown repository, missing file (hub errors vary): all "not here"
            error = exc
    raise RewardWeightsNotFoundError(
        f"{filename} of {repo_id!r} (for {purpose}) is not in the local Hugging Face cache and could not be "
        f"downloaded ({type(error).__name__}). {fetch}"
    ) from error


def image_embeddings(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """Projected CLIP image embeddings ``(B, D)`` (transformers 4 returns a tensor, 5 a ModelOutput)."""
    out = model.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, Tensor) else out.pooler_output


def text_embeddings(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Projected CLIP text embeddings ``(B, D)``."""
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, Tensor) else out.pooler_output


def clip_image_size(model: nn.Module) -> int:
    """Input resolution of a CLIP model's vision tower (224 for ViT-L/14)."""
    config = model.config
    return int(getattr(getattr(config, "vision_config", config), "image_size", 224))


# ------------------------------------------------------------------------------------------------
# The published MLP head
# ------------------------------------------------------------------------------------------------
class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor MLP; parameter names match the published state dict (``layers.N``).

    Args:
        input_size: CLIP embedding width (768 for ViT-L/14).
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        """``(B, input_size)`` L2-normalised embeddings -> ``(B,)`` scores."""
        return self.layers(embeds).squeeze(-1)


def default_head_path() -> Path:
    """Where the head ships inside the installed package."""
    return Path(str(resources.files("diffusion_mdp").joinpath("data", "aesthetic", HEAD_FILENAME)))


def load_aesthetic_head(path: str | os.PathLike[str] | None = None) -> AestheticMLP:
    """The published head (float32, eval mode) from ``path`` or the package data.

    Raises:
        RewardWeightsNotFoundError: The file is missing (the message says where to get it and put it).
    """
    path = Path(path).expanduser() if path is not None else default_head_path()
    if not path.is_file():
        raise RewardWeightsNotFoundError(
            f"aesthetic head {path} not found. It is {HEAD_FILENAME} (sha256 {HEAD_SHA256}) from "
            "https://github.com/christophschuhmann/improved-aesthetic-predictor: put it at "
            f"{default_head_path()} (reinstall diffusion-mdp) or pass head=<path to the .pth file>"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = AestheticMLP(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict(state)
    return head.requires_grad_(False).eval()


# ------------------------------------------------------------------------------------------------
# The reward
# ------------------------------------------------------------------------------------------------
class AestheticScorer:
    """``reward(images, prompts, metadata) -> (scores (B,), info)``: the LAION aesthetic score of each image.

    Args:
        clip_model: Hub id, folder, or a ``CLIPModel`` instance (tests pass tiny random ones).
        head: Path of the head's state dict, an :class:`AestheticMLP`, or None (the shipped one).
        device: Where CLIP and the head run (default: the current CUDA device, else CPU).
        dtype: CLIP's weight dtype (float16 halves its memory on GPU; the head stays float32).
        batch_size: Images per CLIP forward.
    """

    def __init__(
        self,
        clip_model: str | os.PathLike[str] | nn.Module = DEFAULT_CLIP_MODEL,
        head: str | os.PathLike[str] | AestheticMLP | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        # The head first: it is cheap, and a missing file should fail before CLIP's 1.7 GB load.
        self.head = (head if isinstance(head, AestheticMLP) else load_aesthetic_head(head)).to(self.device).eval()
        self.clip = load_clip(clip_model, self.device, dtype)
        self.dtype = dtype
        self.batch_size = batch_size
        self.image_size = clip_image_size(self.clip)

    @torch.no_grad()
    def embed(self, images: np.ndarray | Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings ``(B, D)`` float32 of uint8 ``(B, H, W, 3)`` images."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = clip_preprocess(images[start : start + self.batch_size], self.image_size, device=self.device)
            embeds = image_embeddings(self.clip, pixels.to(self.dtype)).float()
            chunks.append(embeds / embeds.norm(dim=-1, keepdim=True))
        return torch.cat(chunks)

    @torch.no_grad()
    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        scores = self.head(self.embed(images)).double().cpu().numpy()
        return scores, {}


@register_reward("aesthetic")
def aesthetic(
    clip_model: str | os.PathLike[str] | nn.Module = DEFAULT_CLIP_MODEL,
    head: str | os.PathLike[str] | AestheticMLP | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> AestheticScorer:
    """The LAION aesthetic predictor (CLIP ViT-L/14 + the sac+logos+ava1 MLP); see :class:`AestheticScorer`."""
    return AestheticScorer(clip_model, head, device, dtype, batch_size)


__all__ = [
    "AestheticMLP",
    "AestheticScorer",
    "RewardWeightsNotFoundError",
    "clip_preprocess",
    "hub_file",
    "load_aesthetic_head",
    "load_clip",
    "pil_bicubic_matrix",
]
