"""tiny-shapes: procedural captioned shapes, the bundled text-to-image model and its captioner.

- :mod:`diffusion_mdp.shapes.dataset`: the image generator, captions and their parsing.
- :mod:`diffusion_mdp.shapes.prompts`: the ``shapes_train``, ``shapes_heldout`` and ``shapes_counting``
  prompt sets.
- :mod:`diffusion_mdp.shapes.captioner`: the miniature VLM that captions images (used by the rewards).
- :mod:`diffusion_mdp.shapes.train_model` / :mod:`diffusion_mdp.shapes.train_captioner`: training scripts.
- :mod:`diffusion_mdp.shapes.train_flow_model`: training script of tiny-shapes-flow, the same world as a
  flow-matching ``StableDiffusion3Pipeline``.
"""

from importlib import resources
from pathlib import Path


def model_path() -> Path:
    """Folder of the bundled Stable Diffusion pipeline (``StableDiffusionPipeline.from_pretrained(...)``)."""
    return Path(str(resources.files("diffusion_mdp").joinpath("data", "tiny-shapes")))


def flow_model_path() -> Path:
    """Folder of the bundled flow-matching pipeline (``StableDiffusion3Pipeline.from_pretrained(...)``)."""
    return Path(str(resources.files("diffusion_mdp").joinpath("data", "tiny-shapes-flow")))


def captioner_path() -> Path:
    """Folder of the bundled captioner weights."""
    return Path(str(resources.files("diffusion_mdp").joinpath("data", "captioner")))


__all__ = ["captioner_path", "flow_model_path", "model_path"]
