"""The captioner: a miniature vision-language model that describes tiny-shapes images.

It plays the part of LLaVA in the paper's prompt-alignment experiment: a small CNN reads a 32×32 image and
predicts the count (1–4), the colour (6) and the shape (3) with three softmax heads; the caption is
written from the most likely value of each (``"three blue triangles"``). The probabilities are exposed too,
so a reward can be dense (see :mod:`diffusion_mdp.rewards.shapes`).

The bundled weights (``diffusion_mdp/data/captioner``) were trained by
:mod:`diffusion_mdp.shapes.train_captioner` on procedural images with tint, pattern, blur and noise
augmentations, so the judge stays right on imperfect generated samples.

>>> import numpy as np
>>> from diffusion_mdp.shapes.dataset import ShapeSpec, render
>>> captioner = Captioner.load()
>>> image = render(ShapeSpec(3, "blue", "triangle"), np.random.default_rng(0))
>>> captioner.caption(image[None])
['three blue triangles']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffusion_mdp.shapes.dataset import COLOUR_NAMES, COUNTS, SHAPES, make_caption

ATTRIBUTES: dict[str, tuple[Any, ...]] = {"count": COUNTS, "colour": COLOUR_NAMES, "shape": SHAPES}
WEIGHTS_FILE = "captioner.safetensors"
CONFIG_FILE = "config.json"


class CaptionerNet(nn.Module):
    """Three conv stages (32→16→8→4) and three linear heads on avg- and max-pooled features.

    Average pooling keeps a signal proportional to how many shapes there are (counting); max pooling keeps
    the strongest local evidence (colour, shape).

    Args:
        width: Channels of the first stage (doubled at each of the next two).
        image_size: Input side in pixels (32 for the bundled model).
    """

    def __init__(self, width: int = 32, image_size: int = 32) -> None:
        super().__init__()
        self.width, self.image_size = width, image_size
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (width, 2 * width, 4 * width):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.trunk = nn.Sequential(nn.Linear(2 * c_in, 128), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute.

        Args:
            x: Float images ``(B, 3, H, W)`` in [0, 1].

        Returns:
            ``{"count": (B, 4), "colour": (B, 6), "shape": (B, 3)}`` logits.
        """
        f = self.features((x - 0.5) / 0.5)
        h = self.trunk(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))
        return {name: head(h) for name, head in self.heads.items()}


def images_to_tensor(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` → float ``(B, 3, H, W)`` in [0, 1] (resized to 32×32 if needed)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (32, 32):
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="area")
    return x


class Captioner:
    """Loaded captioner: probabilities, attributes and captions for batches of uint8 images.

    Args:
        net: The network (eval mode is set here).
        device: Where to run it.
    """

    def __init__(self, net: CaptionerNet, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> Captioner:
        """Load weights from ``path`` (default: the bundled ``diffusion_mdp/data/captioner``)."""
        from safetensors.torch import load_file

        from diffusion_mdp.shapes import captioner_path

        folder = Path(path) if path is not None else captioner_path()
        config = json.loads((folder / CONFIG_FILE).read_text())
        net = CaptionerNet(width=config["width"], image_size=config["image_size"])
        state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
        net.load_state_dict(state)
        return cls(net, device)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``captioner.safetensors`` (fp16, to stay small) and ``config.json`` to ``path``."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu()
                 for k, v in self.net.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        config = {"width": self.net.width, "image_size": self.net.image_size,
                  "attributes": {k: list(v) for k, v in ATTRIBUTES.items()}, **(extra or {})}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Softmax probabilities of each attribute value.

        Args:
            images: uint8 ``(B, H, W, 3)``.
            batch_size: Images per forward pass.

        Returns:
            ``{"count": (B, 4), "colour": (B, 6), "shape": (B, 3)}`` float arrays; the columns follow
            :data:`ATTRIBUTES` (counts 1–4, ``COLOUR_NAMES``, ``SHAPES``).
        """
        out: dict[str, list[np.ndarray]] = {name: [] for name in ATTRIBUTES}
        for i in range(0, len(images), batch_size):
            logits = self.net(images_to_tensor(images[i : i + batch_size], self.device))
            for name, value in logits.items():
                out[name].append(value.float().softmax(-1).cpu().numpy())
        return {name: np.concatenate(parts) if parts else np.zeros((0, len(ATTRIBUTES[name])))
                for name, parts in out.items()}

    def attributes(self, images: np.ndarray) -> list[dict[str, Any]]:
        """The most likely ``{"count", "colour", "shape"}`` of each image."""
        probs = self.probabilities(images)
        best = {name: p.argmax(-1) for name, p in probs.items()}
        return [{name: ATTRIBUTES[name][int(best[name][i])] for name in ATTRIBUTES} for i in range(len(images))]

    def caption(self, images: np.ndarray) -> list[str]:
        """One caption per image, e.g. ``["a red circle", "three blue triangles"]``."""
        return [make_caption(a["count"], a["colour"], a["shape"]) for a in self.attributes(images)]


__all__ = ["ATTRIBUTES", "Captioner", "CaptionerNet", "images_to_tensor"]
