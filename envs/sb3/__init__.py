"""Stock Stable-Baselines3 PPO on the denoising MDP: a VecEnv adapter and an ``ActorCriticPolicy``.

Two pieces are enough for ``stable_baselines3.PPO`` to train a diffusion model:

- :class:`DenoisingSB3VecEnv` wraps the natively batched :class:`~diffusion_mdp.envs.DenoisingVectorEnv` as
  an SB3 ``VecEnv`` (one UNet batch, one decode, one reward call per step — not N copies of a single env).
  Its observations are the env's arrays (``latent``, ``timestep``, ``prompt_id``); the policy maps
  ``prompt_id`` back to the prompt string. It can also normalise the terminal reward per prompt
  (DDPO's stat tracker) before SB3 sees it: with γ = λ = 1 and no critic, SB3's GAE then produces exactly
  DDPO's advantages (see :func:`ddpo_ppo_kwargs`). The raw reward stays in ``info["episode"]["r"]``, which
  is what SB3 logs as ``rollout/ep_rew_mean``. To put SB3's ``VecMonitor`` in between (it sums the rewards
  it sees), normalise *outside* it: ``NormalizeTerminalReward(VecMonitor(DenoisingSB3VecEnv(...,
  reward_normalization="none")))`` — :func:`make_sb3_env` with ``monitor=True`` builds that chain.
- :class:`DiffusionActorCriticPolicy` is an ``ActorCriticPolicy`` whose action distribution is the
  DDIM step's Gaussian N(μ_θ(x_t, t, c), σ_t² I) from :class:`~diffusion_mdp.policy.DiffusionPolicy`
  (σ_t fixed by the schedule: a per-timestep log-std, not a learned one), with DDPO's log-prob convention
  (the **mean** over latent dimensions), so ``clip_range=1e-4`` means what it means in DDPO-IS.

The pieces: ``vec_env.py`` (the VecEnv adapter), ``normalization.py`` (DDPO's terminal-reward normalisation),
``wrappers.py`` (:class:`NormalizeTerminalReward` outside ``VecMonitor``, :func:`make_sb3_env`),
``actor_critic.py`` (the action distribution and the policy), ``settings.py`` (the ``PPO`` / ``A2C`` /
``policy_kwargs`` settings); every name is importable from here.

Example:
    >>> import tempfile, torch
    >>> from stable_baselines3 import PPO
    >>> from diffusion_mdp.testing import build_reference_tiny_pipeline
    >>> folder = build_reference_tiny_pipeline(tempfile.mkdtemp())
    >>> env = DenoisingSB3VecEnv(num_envs=2, model=folder, prompts=["a red circle"], num_steps=2)
    >>> model = PPO(DiffusionActorCriticPolicy, env, **ddpo_ppo_kwargs(env, batch_size=4),
    ...             policy_kwargs=diffusion_policy_kwargs(env, guidance_scale=1.0))
    >>> _ = model.learn(total_timesteps=4)
    >>> model.num_timesteps  # one rollout: T = 2 steps of N = 2 episodes
    4
"""

from .actor_critic import DDIMGaussianDistribution, DiffusionActorCriticPolicy
from .normalization import RewardNormalization, _normalize  # noqa: F401  (re-exported)
from .settings import ddpo_a2c_kwargs, ddpo_ppo_kwargs, diffusion_policy_kwargs
from .vec_env import DenoisingSB3VecEnv, _adapter, _refuse_stock_policy  # noqa: F401  (re-exported)
from .wrappers import NormalizeTerminalReward, make_sb3_env

__all__ = [
    "DDIMGaussianDistribution",
    "DenoisingSB3VecEnv",
    "DiffusionActorCriticPolicy",
    "NormalizeTerminalReward",
    "ddpo_a2c_kwargs",
    "ddpo_ppo_kwargs",
    "diffusion_policy_kwargs",
    "make_sb3_env",
]
