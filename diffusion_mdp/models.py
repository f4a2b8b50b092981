"""Loading a text-to-image diffusion model's components (UNet, VAE, text encoder, tokenizer, scheduler).

The environment needs the VAE (to decode x_0 for the reward) and the scheduler (the MDP's schedule); the
policy needs the UNet and the text encoder. :func:`load_components` loads all of them once from

- ``"tiny-shapes"`` (or ``None``): the bundled tiny text-to-image model, shipped inside the package;
- a local folder laid out as a diffusers Stable Diffusion pipeline (``model_index.json``, ``unet/``, ...);
- a Hugging Face hub id (``"CompVis/stable-diffusion-v1-4"``), from the local cache first, then the hub.

Stable Diffusion XL pipelines (``model_index.json`` naming ``StableDiffusionXLPipeline``, or a
``text_encoder_2/`` folder) also load their second text encoder and tokenizer; the policy then feeds the
UNet the concatenated prompt embeddings, the pooled embedding and the size "time ids", as diffusers does.

Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``) and FLUX (``FluxPipeline``) folders, detected from
``model_index.json`` as well, load their transformer (kept in the ``unet`` field: it is the policy's network),
text encoders and flow-matching scheduler; what differs per family lives in :mod:`diffusion_mdp.families`.

Nothing is downloaded silently when offline: a missing model raises :class:`ModelNotAvailableError` with
the model id and how to make it available.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

BUNDLED_MODEL = "tiny-shapes"
BUNDLED_FLOW_MODEL = "tiny-shapes-flow"  # the same world as a flow-matching StableDiffusion3Pipeline
BUNDLED_MODELS = (BUNDLED_MODEL, BUNDLED_FLOW_MODEL)
PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelNotAvailableError(OSError):
    """A model could not be found locally and could not be downloaded."""


@dataclass
class DiffusionComponents:
    """The pieces of a Stable Diffusion pipeline that the MDP and the policy use.

    Attributes:
        unet: The policy's network: ``UNet2DConditionModel``, or the transformer of SD3 / FLUX.
        vae: ``AutoencoderKL``; latents are ``vae.config.scaling_factor`` times its encodings.
        text_encoder: ``CLIPTextModel`` (frozen).
        tokenizer: ``CLIPTokenizer``.
        scheduler: ``DDIMScheduler`` built from the pipeline's scheduler config (SD3 / FLUX: their
            ``FlowMatchEulerDiscreteScheduler``).
        source: Where the model came from (name, folder or hub id), for logs and checkpoints.
        default_prompts: Name of the prompt set the model is meant for (``None``: the paper's animals).
        family: ``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"`` (default: SDXL when there is a second text encoder).
        text_encoder_3, tokenizer_3: SD3's T5 (None when the pipeline was saved without it).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str
    default_prompts: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False
    family: str | None = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = "sdxl" if self.text_encoder_2 is not None else "sd"

    @property
    def is_sdxl(self) -> bool:
        """Whether this is an SDXL pipeline (two text encoders, pooled embeddings and time ids)."""
        return self.family == "sdxl"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a latent x_t."""
        if self.family in ("sd3", "flux"):
            from diffusion_mdp.families import family_module

            return family_module(self.family).latent_shape(self)
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(height), int(width))

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of a decoded image."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        _, height, width = self.latent_shape
        return (height * factor, width * factor)

    def to(self, device: torch.device | str) -> DiffusionComponents:
        """Move every module to ``device`` (in place) and return self."""
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            if module is not None:
                module.to(device)
        return self


def bundled_model_path(name: str = BUNDLED_MODEL) -> Path:
    """Folder of a bundled pipeline (``"tiny-shapes"`` or ``"tiny-shapes-flow"``) inside the installed package."""
    return Path(str(resources.files("diffusion_mdp").joinpath("data", name)))


def resolve_model(model: str | os.PathLike[str] | None) -> tuple[str | Path, bool]:
    """Map what the user passed to ``(local folder or hub id, is_local)``."""
    if model is None or model in BUNDLED_MODELS:
        name = BUNDLED_MODEL if model is None else str(model)
        path = bundled_model_path(name)
        if not (path / "model_index.json").is_file():
            raise ModelNotAvailableError(
                f"the bundled model {name!r} is missing from {path}; reinstall diffusion-mdp "
                "(`pip install -e .` from the repository) or pass model=<folder or hub id>"
            )
        return path, True
    path = Path(os.fspath(model)).expanduser()
    if path.exists() or os.fspath(model).startswith((".", "/", "~")):
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {path} does not exist")
        subfolders: tuple[str, ...] = PIPELINE_SUBFOLDERS
        if (path / "transformer").is_dir():  # SD3 / FLUX
            from diffusion_mdp.families import FLOW_SUBFOLDERS

            subfolders = FLOW_SUBFOLDERS
        missing = [name for name in ("model_index.json", *subfolders) if not (path / name).exists()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a diffusers Stable Diffusion pipeline folder: missing {', '.join(missing)}. "
                "Save one with `StableDiffusionPipeline.save_pretrained(folder)` (SDXL: StableDiffusionXLPipeline, "
                "SD3: StableDiffusion3Pipeline, FLUX: FluxPipeline)."
            )
        return path, True
    text = os.fspath(model)
    _check_hub_id(text, path)
    return text, False


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def _check_hub_id(text: str, path: Path) -> None:
    """Refuse at once what cannot be a hub id, or is a mistyped local folder, instead of trying the hub for it.

    A hub id is ``name`` or ``org/name``. Anything else (more slashes, backslashes, spaces), a path whose first
    folder exists here (``models/sd`` with ``models/`` present), or a name one letter away from the bundled
    model's, is a folder that does not exist; the error says so, with the close names that do exist.
    """
    first = Path(text).parts[0] if Path(text).parts else text
    local_parent = len(Path(text).parts) > 1 and Path(first).is_dir()
    if _HUB_ID.fullmatch(text) and not local_parent and not text.endswith((".", "-")):
        close = difflib.get_close_matches(text, list(BUNDLED_MODELS), n=1, cutoff=0.85)
        if not close or _in_hub_cache(text):
            return
        raise FileNotFoundError(
            f"model {text!r} is neither a folder here nor the bundled model: did you mean {close[0]!r}? "
            "(A hub id that is not cached would be tried online.)"
        )
    parent = path.parent if str(path.parent) else Path(".")
    hint = ""
    if parent.is_dir():
        names = [p.name for p in parent.iterdir() if p.is_dir()]
        close = difflib.get_close_matches(path.name, names, n=3)
        hint = f"; in {parent}/ there are {', '.join(close)}" if close else ""
    raise FileNotFoundError(
        f"model folder {path} does not exist{hint}. Give an existing diffusers pipeline folder, 'tiny-shapes', "
        "or a hub id of the form org/name"
    )


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a hub id has a cached model_index.json (a real hub model, not a typo)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except Exception:  # an id the hub library rejects: not cached
        return False


def load_components(
    model: str | os.PathLike[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    torch_dtype: torch.dtype = torch.float32,
) -> DiffusionComponents:
    """Load a Stable Diffusion pipeline's components. Each call returns fresh modules.

    Args:
        model: ``"tiny-shapes"``/None (bundled), a pipeline folder, or a hub id.
        device: Where to put the modules.
        torch_dtype: Dtype of the weights (keep float32 for training; see the agent's mixed precision).

    Raises:
        ModelNotAvailableError: A hub id that is neither cached nor downloadable.
        FileNotFoundError: A folder that does not exist or lacks pipeline files.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusion_mdp.families import detect_family, family_module, is_flow

    location, is_local = resolve_model(model)

    def load(cls: Any, subfolder: str, **kwargs: Any) -> Any:
        attempts = [True] if is_local else [True, False]  # cache first, then the hub
        error: Exception | None = None
        for local_only in attempts:
            try:
                return cls.from_pretrained(
                    os.fspath(location), subfolder=subfolder, local_files_only=local_only, **kwargs
                )
            except (OSError, ValueError) as exc:  # diffusers/transformers raise these for missing files
                error = exc
        if is_local:
            raise FileNotFoundError(f"could not load {subfolder}/ from {location}: {error}") from error
        raise ModelNotAvailableError(
            f"could not load {subfolder}/ of model {location!r}: it is not in the local Hugging Face cache "
            f"and the hub is unreachable ({type(error).__name__}). On a machine with access run "
            f"`huggingface-cli download {location}` and copy the cache (~/.cache/huggingface), or "
            "pass model=<local folder saved with StableDiffusionPipeline.save_pretrained> (or the "
            "StableDiffusionXLPipeline / StableDiffusion3Pipeline / FluxPipeline one)."
        ) from error

    dtype_kw = {"torch_dtype": torch_dtype}
    index = load_model_index(location, is_local)
    family = detect_family(index)
    if is_flow(family):
        fields = family_module(family).load(load, index, torch_dtype)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if fields.get(name) is not None:
                fields[name].requires_grad_(False).eval()
        source = BUNDLED_MODEL if model is None else os.fspath(model)
        default_prompts = "shapes_train" if source in BUNDLED_MODELS else None
        return DiffusionComponents(source=source, family=family, default_prompts=default_prompts, **fields).to(device)
    sdxl = "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index
    unet = load(UNet2DConditionModel, "unet", **dtype_kw)
    vae = load(AutoencoderKL, "vae", **dtype_kw)
    text_encoder = load(CLIPTextModel, "text_encoder", dtype=torch_dtype)
    tokenizer = load(CLIPTokenizer, "tokenizer")
    scheduler = load(DDIMScheduler, "scheduler")
    # SDXL ships an EulerDiscreteScheduler config; read as DDIM, keys it lacks would take DDIM's defaults
    # (clip_sample=True, set_alpha_to_one=True), which SD-family models were never trained with.
    raw_scheduler = scheduler_config_keys(location, is_local)
    fixes = {k: False for k in ("clip_sample", "set_alpha_to_one") if k not in raw_scheduler}
    if fixes:
        scheduler = DDIMScheduler.from_config({**scheduler.config, **fixes})
    text_encoder_2 = tokenizer_2 = None
    if sdxl:
        from transformers import CLIPTextModelWithProjection

        text_encoder_2 = load(CLIPTextModelWithProjection, "text_encoder_2", dtype=torch_dtype)
        tokenizer_2 = load(CLIPTokenizer, "tokenizer_2")
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            module.requires_grad_(False).eval()
    source = BUNDLED_MODEL if model is None else os.fspath(model)
    default_prompts = "shapes_train" if source in BUNDLED_MODELS else None
    return DiffusionComponents(
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        source,
        default_prompts,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", sdxl)),
    ).to(device)


def _read_json(location: str | Path, filename: str, is_local: bool) -> dict[str, Any] | None:
    """A JSON file of a pipeline folder or a hub repository (cache first, then the hub); None if unavailable."""
    import json

    if is_local:
        path = Path(location) / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download

    for local_only in (True, False):
        try:
            downloaded = hf_hub_download(os.fspath(location), filename, local_files_only=local_only)
        except Exception:  # missing file, offline, gated repository: the component loads report it clearly
            continue
        return json.loads(Path(downloaded).read_text())
    return None


def load_model_index(location: str | Path, is_local: bool) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (empty when unavailable: the component loads then raise clearly)."""
    return _read_json(location, "model_index.json", is_local) or {}


def scheduler_config_keys(location: str | Path, is_local: bool) -> dict[str, Any]:
    """The raw ``scheduler/scheduler_config.json`` (to tell keys it sets from DDIM's defaults)."""
    config = _read_json(location, "scheduler/scheduler_config.json", is_local)
    # Unreadable: assume the keys are set (keep what the DDIM scheduler loaded).
    return config if config is not None else {"clip_sample": None, "set_alpha_to_one": None}
