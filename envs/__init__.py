"""Gymnasium environments of the denoising MDP.

Installed as ``diffusion_mdp.envs`` (the repository keeps them in the top-level ``envs/`` folder). Most
users never import this module: ``import diffusion_mdp`` registers ``DenoisingMDP-v0`` for ``gym.make`` and
``gym.make_vec``.
"""

from .denoising import DenoisingEnv
from .vector import DenoisingVectorEnv

__all__ = ["DenoisingEnv", "DenoisingVectorEnv"]
