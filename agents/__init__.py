"""RL algorithms for the denoising MDP (installed as ``diffusion_mdp.agents``)."""
