"""diffusion-mdp: the denoising process of a diffusion model as a reinforcement-learning problem.

``import diffusion_mdp`` registers the Gymnasium environment ``DenoisingMDP-v0`` and is the one import the
common paths need:

>>> import gymnasium as gym
>>> import diffusion_mdp
>>> "DenoisingMDP-v0" in gym.registry
True
"""

from diffusion_mdp.registration import register_envs

__version__ = "0.1.0"

register_envs()
