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

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import Schedule
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecMonitor
from torch import Tensor, nn

from diffusion_mdp.ddim import LogProbReduction, gaussian_log_prob
from diffusion_mdp.envs import DenoisingVectorEnv
from diffusion_mdp.policy import DiffusionPolicy

RewardNormalization = Literal["per_prompt", "group", "batch", "none"]


# --------------------------------------------------------------------------------------------------
# The VecEnv adapter
# --------------------------------------------------------------------------------------------------
class DenoisingSB3VecEnv(VecEnv):
    """The denoising MDP's N batched episodes as an SB3 ``VecEnv``.

    Observations: ``Dict(latent=Box((C, h, w)), timestep=Discrete(num_train_timesteps),
    prompt_id=Discrete(len(prompts)))``, NumPy, batched. Actions: ``(N, C, h, w)`` next latents. Episodes end
    together after T steps; the step that ends them returns the next episodes' first observation and puts the
    terminal one in ``infos[i]["terminal_observation"]`` (SB3's convention).

    Args:
        num_envs: N.
        reward_normalization: What the terminal reward handed to SB3 is: ``"per_prompt"`` (DDPO's stat
            tracker: (r - μ_c) / σ_c over the prompt's recent rewards), ``"group"`` (statistics of the
            ``group_size`` samples of the prompt in this batch, GRPO), ``"batch"`` ((r - μ) / σ over the N
            episodes), or ``"none"`` (the raw reward). Normalised rewards are clipped to ± ``adv_clip_max``.
        group_size: k > 1: every batch of N episodes holds k episodes of each of N / k prompts (drawn
            uniformly), as the library's ``advantage_mode="group"`` does, so each prompt's statistics are
            available at once; 1: each episode draws its own prompt.
        stat_buffer_size: Per-prompt tracker: rewards kept per prompt.
        stat_min_count: Per-prompt tracker: below this many, use the batch statistics.
        adv_clip_max: Clip of normalised rewards (DDPO's advantage clip).
        **env_kwargs: Everything else goes to :class:`~diffusion_mdp.envs.DenoisingVectorEnv` (``model``,
            ``reward``, ``prompts``, ``num_steps``, ``eta``, ``components``, ...).

    Attributes:
        venv: The wrapped ``DenoisingVectorEnv`` (its ``mdp`` holds the prompt set, schedule and model).
        last_images: uint8 ``(N, H, W, 3)`` images of the last finished episodes (None before any).
        last_raw_rewards: ``(N,)`` their raw rewards; ``last_prompts``: their N prompts.
    """

    def __init__(
        self,
        num_envs: int = 1,
        reward_normalization: RewardNormalization = "per_prompt",
        stat_buffer_size: int = 32,
        stat_min_count: int = 4,
        adv_clip_max: float = 5.0,
        group_size: int = 1,
        seed: int = 0,
        **env_kwargs: Any,
    ) -> None:
        if reward_normalization not in ("per_prompt", "group", "batch", "none"):
            raise ValueError(
                f"reward_normalization must be per_prompt, group, batch or none, got {reward_normalization!r}"
            )
        if group_size < 1 or num_envs % group_size:
            raise ValueError(f"group_size={group_size} must divide num_envs={num_envs}")
        if reward_normalization == "group" and group_size < 2:
            raise ValueError("reward_normalization='group' needs group_size >= 2")
        # The adapter resets the episodes itself (to choose their prompts), so the vector env never autoresets.
        env_kwargs["autoreset_mode"] = "Disabled"
        self.venv = DenoisingVectorEnv(num_envs=num_envs, **env_kwargs)
        self.group_size = group_size
        self._prompt_rng = np.random.default_rng(seed)
        # The env's own (array-only) observation space: latent, timestep, prompt_id.
        observation_space = self.venv.single_observation_space
        super().__init__(num_envs, observation_space, self.venv.single_action_space)
        self.reward_normalization = reward_normalization
        self.adv_clip_max = adv_clip_max
        from diffusion_mdp.normalization import PerPromptStatTracker

        self.stat_tracker = PerPromptStatTracker(stat_buffer_size, stat_min_count)
        self._actions: np.ndarray | None = None
        self._policy_checked = False
        self._episode_start = time.time()
        self.last_images: np.ndarray | None = None
        self.last_raw_rewards: np.ndarray | None = None
        self.last_prompts: list[str] = []

    @property
    def mdp(self) -> Any:
        return self.venv.mdp

    @property
    def prompts(self) -> list[str]:
        """The prompt set in ``prompt_id`` order."""
        return list(self.venv.mdp.prompts.prompts)

    def _convert(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        # SB3's buffers store NumPy arrays; prompt_id names the prompt.
        return {
            "latent": np.asarray(obs["latent"], dtype=np.float32),
            "timestep": np.asarray(obs["timestep"], dtype=np.int64),
            "prompt_id": np.asarray(obs["prompt_id"], dtype=np.int64),
        }

    def _reset_episodes(self, seed: int | None = None) -> dict[str, Any]:
        options = None
        if self.group_size > 1:
            num_groups = self.num_envs // self.group_size
            num_prompts = len(self.venv.mdp.prompts)
            chosen = self._prompt_rng.choice(num_prompts, num_groups, replace=num_groups > num_prompts)
            options = {"prompt_ids": np.repeat(chosen, self.group_size)}
        obs, _ = self.venv.reset(seed=seed, options=options)
        return obs

    def reset(self) -> dict[str, np.ndarray]:
        # SB3 semantics: seeds set by ``seed()`` apply to this reset only.
        seed = self._seeds[0] if self._seeds and self._seeds[0] is not None else None
        if seed is not None:
            self._prompt_rng = np.random.default_rng(seed)
        obs = self._reset_episodes(seed)
        self._reset_seeds()
        self._reset_options()
        self._episode_start = time.time()
        return self._convert(obs)

    def step_async(self, actions: np.ndarray) -> None:
        if not self._policy_checked:
            self._policy_checked = True
            _refuse_stock_policy()
        self._actions = actions

    def normalize(self, rewards: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """The terminal reward SB3 trains on, ``(N,)``: normalised per prompt / batch, or raw."""
        return _normalize(self, self.reward_normalization, rewards, prompts)

    def step_wait(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[dict[str, Any]]]:
        assert self._actions is not None, "step_async() first"
        actions = np.asarray(self._actions, dtype=np.float32).reshape(self.num_envs, *self.venv.mdp.latent_shape)
        obs, rewards, terminated, truncated, info = self.venv.step(actions)
        dones = np.logical_or(terminated, truncated)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        rewards = np.asarray(rewards, dtype=np.float64)
        if dones.all():
            raw = rewards.copy()
            rewards = self.normalize(raw, info["prompt"])
            final = self._convert(obs)  # the terminal observation; SB3 expects the next episodes' first one
            obs = self._reset_episodes()
            length = self.venv.mdp.num_steps
            elapsed = time.time() - self._episode_start
            for i in range(self.num_envs):
                infos[i] = {
                    "terminal_observation": {key: value[i] for key, value in final.items()},
                    "episode": {"r": float(raw[i]), "l": length, "t": elapsed},  # what SB3 logs
                    "raw_reward": float(raw[i]),
                    "prompt": str(info["prompt"][i]),
                    "TimeLimit.truncated": False,
                }
            self.last_images, self.last_raw_rewards, self.last_prompts = info["image"], raw, list(info["prompt"])
            self._episode_start = time.time()
        return self._convert(obs), rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    # SB3's attribute plumbing: there is one underlying (batched) environment, so every index maps to it.
    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self.venv, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any) -> list[Any]:
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: Any = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


def _normalize(owner: Any, mode: RewardNormalization, rewards: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """DDPO's terminal-reward normalisation with ``owner``'s tracker, group size and clip, ``(N,)``."""
    if mode == "none":
        return rewards
    if mode == "per_prompt":
        normalised = owner.stat_tracker.update(list(prompts), rewards)
    elif mode == "group":
        from diffusion_mdp.normalization import group_statistics

        mean, std = group_statistics(np.arange(len(rewards)) // owner.group_size, rewards)
        normalised = (rewards - mean) / std
    else:
        normalised = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    return np.clip(normalised, -owner.adv_clip_max, owner.adv_clip_max)


class NormalizeTerminalReward(VecEnvWrapper):
    """DDPO's terminal-reward normalisation as an SB3 wrapper, to sit *outside* ``VecMonitor``.

    ``VecMonitor`` records the rewards it sees as ``info["episode"]["r"]`` (SB3's ``ep_rew_mean``); under
    this wrapper those are the raw rewards, while the algorithm trains on the normalised ones.

    Args:
        venv: A (possibly monitored) :class:`DenoisingSB3VecEnv` built with ``reward_normalization="none"``.
        reward_normalization: ``"per_prompt"``, ``"group"`` or ``"batch"`` (see :class:`DenoisingSB3VecEnv`).
        stat_buffer_size, stat_min_count, adv_clip_max: As for :class:`DenoisingSB3VecEnv`.
    """

    def __init__(
        self,
        venv: VecEnv,
        reward_normalization: RewardNormalization = "per_prompt",
        stat_buffer_size: int = 32,
        stat_min_count: int = 4,
        adv_clip_max: float = 5.0,
    ) -> None:
        from diffusion_mdp.normalization import PerPromptStatTracker

        super().__init__(venv)
        inner = _adapter(venv).reward_normalization
        if inner != "none":
            raise ValueError(
                f"the wrapped adapter already normalises its rewards ({inner!r}): build it with "
                "reward_normalization='none' and normalise here only"
            )
        self.reward_normalization = reward_normalization
        self.group_size = _adapter(venv).group_size
        if reward_normalization == "group" and self.group_size < 2:
            raise ValueError("reward_normalization='group' needs the adapter's group_size >= 2")
        self.stat_tracker = PerPromptStatTracker(stat_buffer_size, stat_min_count)
        self.adv_clip_max = adv_clip_max

    def reset(self) -> Any:
        return self.venv.reset()

    def step_wait(self) -> Any:
        obs, rewards, dones, infos = self.venv.step_wait()
        if dones.all():
            prompts = [info["prompt"] for info in infos]
            rewards = _normalize(self, self.reward_normalization, np.asarray(rewards, np.float64), prompts)
        return obs, np.asarray(rewards, dtype=np.float32), dones, infos


def _refuse_stock_policy() -> None:
    """Warn when an SB3 algorithm drives the adapter with a policy that never touches the UNet.

    A stock policy (``PPO("MultiInputPolicy", env)``) runs: it trains an MLP on flattened latents and
    leaves the diffusion model as it was, which is almost never what was meant. The algorithm is the
    caller a few frames up (``collect_rollouts`` -> ``VecEnv.step`` -> ``step_async``).
    """
    import inspect
    import warnings

    from stable_baselines3.common.base_class import BaseAlgorithm

    frame = inspect.currentframe()
    for _ in range(8):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return
        algorithm = frame.f_locals.get("self")
        if isinstance(algorithm, BaseAlgorithm):
            if not isinstance(algorithm.policy, DiffusionActorCriticPolicy):
                warnings.warn(
                    f"{type(algorithm).__name__} drives the denoising env with {type(algorithm.policy).__name__}, "
                    "which never updates the diffusion model (it trains an MLP on flattened latents). Use "
                    f"{type(algorithm).__name__}(DiffusionActorCriticPolicy, env, "
                    "policy_kwargs=diffusion_policy_kwargs(env), ...)",
                    UserWarning,
                    stacklevel=2,
                )
            return


# --------------------------------------------------------------------------------------------------
# The action distribution and the policy
# --------------------------------------------------------------------------------------------------
class DDIMGaussianDistribution(DiagGaussianDistribution):
    """SB3's diagonal Gaussian with the DDIM step's mean μ_θ ``(B, C, h, w)`` and fixed σ_t ``(B, 1, 1, 1)``.

    ``log_prob`` reduces over latent dimensions like :class:`DiffusionPolicy` (``"mean"``: DDPO's
    convention, so PPO's ratio exp(Δ log π) matches DDPO-IS and its 1e-4 clip range; ``"sum"``: the true
    density, whose ratios are exp(D · Δ) and need a clip range about D = C·h·w times wider).

    Args:
        latent_shape: ``(C, h, w)``.
        reduction: ``"mean"`` or ``"sum"``.
    """

    def __init__(self, latent_shape: tuple[int, int, int], reduction: LogProbReduction = "mean") -> None:
        super().__init__(int(np.prod(latent_shape)))
        self.latent_shape = tuple(latent_shape)
        self.reduction: LogProbReduction = reduction
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    def proba_distribution(self, mean_actions: Tensor, std: Tensor) -> DDIMGaussianDistribution:  # type: ignore[override]
        """Set the distribution: ``mean_actions`` ``(B, C, h, w)``, ``std`` broadcastable to it."""
        self.mean, self.std = mean_actions, std.expand_as(mean_actions)
        self.distribution = torch.distributions.Normal(self.mean, self.std)
        return self

    def _as_latents(self, actions: Tensor) -> Tensor:
        # SB3's rollout buffer stores actions flattened to (B, C*h*w); the env takes (B, C, h, w).
        return actions.reshape(-1, *self.latent_shape)

    def log_prob(self, actions: Tensor) -> Tensor:
        """``(B,)`` log π(a | s), reduced over latent dimensions; gradients flow through μ_θ only."""
        assert self.mean is not None and self.std is not None
        return gaussian_log_prob(self._as_latents(actions), self.mean, self.std, self.reduction)

    def entropy(self) -> Tensor:
        """``(B,)`` entropy, reduced like the log-prob (constant in θ: σ_t is fixed by the schedule)."""
        assert self.std is not None
        per_dim = 0.5 + 0.5 * np.log(2 * np.pi) + torch.log(self.std)
        return per_dim.flatten(1).mean(1) if self.reduction == "mean" else per_dim.flatten(1).sum(1)

    def sample(self) -> Tensor:
        assert self.mean is not None and self.std is not None
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self) -> Tensor:
        assert self.mean is not None
        return self.mean


class DiffusionActorCriticPolicy(ActorCriticPolicy):
    """An SB3 ``ActorCriticPolicy`` whose actor is a :class:`DiffusionPolicy` (its UNet: SB3's parameters).

    Build it through ``PPO(DiffusionActorCriticPolicy, env, policy_kwargs=diffusion_policy_kwargs(env))``.
    The optimiser (``optimizer_class``, AdamW by default here) gets the UNet's *trainable* parameters (all,
    or only a LoRA adapter if one was added beforehand) plus the value head's.

    Args:
        observation_space, action_space, lr_schedule: Given by SB3.
        diffusion_policy: The actor (e.g. ``DiffusionPolicy.from_env(env.venv)``).
        prompts: The prompt strings in ``prompt_id`` order (``env.prompts``).
        value_head: ``"none"``: V ≡ 0, no critic (DDPO; use ``vf_coef=0``); ``"per_prompt"``: a learned
            scalar per prompt (a table V(c), zero-initialised): with γ = λ = 1 the advantage r - V(c) is
            a learned per-prompt baseline.
        optimizer_class, optimizer_kwargs: As in SB3.
        **kwargs: Other ``ActorCriticPolicy`` arguments (ignored net settings are accepted for SB3 compatibility).
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        diffusion_policy: DiffusionPolicy | None = None,
        prompts: Sequence[str] = (),
        value_head: Literal["none", "per_prompt"] = "none",
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
        optimizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if diffusion_policy is None:
            raise ValueError("pass policy_kwargs=diffusion_policy_kwargs(env) (a DiffusionPolicy and its prompts)")
        if value_head not in ("none", "per_prompt"):
            raise ValueError(f"value_head must be 'none' or 'per_prompt', got {value_head!r}")
        # SB3 builds its MLP and action net in _build(); ours is a no-op, the real build follows below.
        kwargs.setdefault("net_arch", [])
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs or {},
            **kwargs,
        )
        self.diffusion = diffusion_policy  # registers the UNet as a submodule (the text encoder stays out)
        self.prompts = list(prompts)
        self.value_head = value_head
        self.values = nn.Embedding(max(1, len(self.prompts)), 1)
        nn.init.zeros_(self.values.weight)
        latent_shape = tuple(action_space.shape)  # type: ignore[arg-type]
        self.action_dist = DDIMGaussianDistribution(latent_shape, diffusion_policy.log_prob_reduction)  # type: ignore[arg-type]
        self.values.requires_grad_(value_head == "per_prompt")
        # The value table is always handed over (a frozen UNet would otherwise leave AdamW with no parameters);
        # without a value head it gets no gradient and AdamW skips it.
        trainable = [p for p in self.diffusion.unet.parameters() if p.requires_grad] + list(self.values.parameters())
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        """Nothing to build: the actor is the diffusion model, added after SB3's ``__init__``."""

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(prompts=self.prompts, value_head=self.value_head)
        return data

    # ----------------------------------------------------------------------------------------------
    def unpack(self, obs: Mapping[str, Tensor]) -> dict[str, Any]:
        """SB3 observations (from the env: ``timestep (B,)``; from the buffer: ``(B, 1)`` floats) → policy obs."""
        timesteps = torch.as_tensor(obs["timestep"]).reshape(-1).round().long()
        prompt_ids = torch.as_tensor(obs["prompt_id"]).reshape(-1).round().long()
        prompts = [self.prompts[int(i)] for i in prompt_ids]
        return {"latent": obs["latent"].float(), "timestep": timesteps, "prompt": prompts, "prompt_ids": prompt_ids}

    def get_distribution(self, obs: Mapping[str, Tensor]) -> DDIMGaussianDistribution:  # type: ignore[override]
        """π(· | s) = N(μ_θ(x_t, t, c), σ_t² I) for a batch of SB3 observations."""
        out = self.diffusion(self.unpack(obs))  # one CFG forward of the UNet, the DDIM mean and σ_t
        return self.action_dist.proba_distribution(out.mean, out.std)

    def predict_values(self, obs: Mapping[str, Tensor]) -> Tensor:  # type: ignore[override]
        """``(B, 1)`` V(s): zeros (no critic) or the per-prompt table."""
        prompt_ids = torch.as_tensor(obs["prompt_id"]).reshape(-1).round().long()
        values = self.values(prompt_ids.to(self.values.weight.device))
        return values if self.value_head == "per_prompt" else torch.zeros_like(values)

    def forward(self, obs: Mapping[str, Tensor], deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """Sample actions ``(B, C, h, w)``; return them with V(s) ``(B, 1)`` and log π(a | s) ``(B,)``."""
        distribution = self.get_distribution(obs)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, self.predict_values(obs), distribution.log_prob(actions)

    def evaluate_actions(self, obs: Mapping[str, Tensor], actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """PPO's training call: ``(V (B, 1), log π(a | s) (B,) with gradients, entropy (B,))``."""
        distribution = self.get_distribution(obs)
        return self.predict_values(obs), distribution.log_prob(actions), distribution.entropy()

    def _predict(self, observation: Mapping[str, Tensor], deterministic: bool = False) -> Tensor:  # type: ignore[override]
        return self.get_distribution(observation).get_actions(deterministic=deterministic)


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
def diffusion_policy_kwargs(
    env: DenoisingSB3VecEnv,
    guidance_scale: float = 5.0,
    lora_rank: int | None = 4,
    value_head: Literal["none", "per_prompt"] = "none",
    diffusion_policy: DiffusionPolicy | None = None,
) -> dict[str, Any]:
    """``policy_kwargs`` for :class:`DiffusionActorCriticPolicy` on ``env``'s model.

    Args:
        env: The adapter (its model, schedule and prompts are used).
        guidance_scale: CFG weight w during rollouts and training (as DDPO).
        lora_rank: Add a LoRA adapter of this rank (alpha = rank) to the UNet's attention and train only it
            (DDPO's setup); None trains the full UNet.
        value_head: See :class:`DiffusionActorCriticPolicy`.
        diffusion_policy: Use this actor instead of building one (its UNet is trained in place).
    """
    policy = diffusion_policy or DiffusionPolicy.from_env(_adapter(env).venv, guidance_scale=guidance_scale)
    if diffusion_policy is None:
        if lora_rank:
            from diffusion_mdp.lora import add_lora

            add_lora(policy.unet, lora_rank, float(lora_rank))
        else:
            policy.unet.requires_grad_(True)
    # AdamW with DDPO's weight decay (torch's default, 1e-2, would pull the LoRA towards 0 a hundred times harder).
    # Named explicitly: A2C swaps in RMSprop unless policy_kwargs names an optimizer.
    return {
        "diffusion_policy": policy,
        "prompts": _adapter(env).prompts,
        "value_head": value_head,
        "optimizer_class": torch.optim.AdamW,
        "optimizer_kwargs": {"weight_decay": 1e-4, "eps": 1e-8},
    }


def ddpo_ppo_kwargs(env: DenoisingSB3VecEnv, batch_size: int | None = None, **overrides: Any) -> dict[str, Any]:
    """``PPO(...)`` settings under which SB3's PPO computes DDPO-IS's loss.

    - ``n_steps = T``: one rollout = one batch of N full episodes (DDPO's sample batch).
    - ``gamma = gae_lambda = 1``: every step's advantage is the terminal reward the env hands over (the
      per-prompt normalised one when the adapter normalises), exactly DDPO's advantage.
    - ``normalize_advantage=False``: SB3 would re-normalise each *minibatch*; DDPO normalises per prompt.
    - ``vf_coef=0``, ``ent_coef=0``: no critic, no entropy bonus (σ_t is fixed anyway).
    - ``clip_range=1e-4``: DDPO's ε for mean-over-dims log-probs; ``max_grad_norm=1``, ``n_epochs=1``,
      lr 3e-4 (DDPO's LoRA settings).

    Args:
        env: The adapter.
        batch_size: SB3 minibatch size in (step, episode) pairs; default N·T (one optimiser step per rollout).
        **overrides: Any other ``PPO`` keyword.
    """
    n_steps = _adapter(env).mdp.num_steps
    kwargs: dict[str, Any] = {
        "n_steps": n_steps,
        "batch_size": batch_size or n_steps * env.num_envs,
        "n_epochs": 1,
        "gamma": 1.0,
        "gae_lambda": 1.0,
        "clip_range": 1e-4,
        "normalize_advantage": False,
        "ent_coef": 0.0,
        "vf_coef": 0.0,
        "max_grad_norm": 1.0,
        "learning_rate": 3e-4,
        "device": "cpu",
    }
    kwargs.update(overrides)
    return kwargs


def ddpo_a2c_kwargs(env: VecEnv, **overrides: Any) -> dict[str, Any]:
    """``A2C(...)`` settings under which SB3's A2C computes DDPO-SF's loss (REINFORCE with DDPO's advantages).

    A2C's policy loss is -(A · log π).mean() over one rollout: with ``n_steps = T``, γ = λ = 1, no critic and
    the adapter's normalised terminal reward as A, that is DDPO-SF, one update per batch of N episodes.
    The optimiser is the one :func:`diffusion_policy_kwargs` names (AdamW): A2C's RMSprop default only
    applies when ``policy_kwargs`` names none. A2C has no ``batch_size``, ``n_epochs`` or ``clip_range``.

    Args:
        env: The adapter (or a wrapper of it).
        **overrides: Any other ``A2C`` keyword.
    """
    kwargs: dict[str, Any] = {
        "n_steps": _adapter(env).mdp.num_steps,
        "gamma": 1.0,
        "gae_lambda": 1.0,
        "normalize_advantage": False,
        "ent_coef": 0.0,
        "vf_coef": 0.0,
        "max_grad_norm": 1.0,
        "learning_rate": 3e-4,
        "device": "cpu",
    }
    kwargs.update(overrides)
    return kwargs


def _adapter(env: VecEnv) -> DenoisingSB3VecEnv:
    """The :class:`DenoisingSB3VecEnv` inside SB3 wrappers."""
    inner: Any = env
    while not isinstance(inner, DenoisingSB3VecEnv):
        if not hasattr(inner, "venv"):
            raise TypeError(f"expected a DenoisingSB3VecEnv (or an SB3 wrapper of one), got {type(env).__name__}")
        inner = inner.venv
    return inner


def make_sb3_env(
    num_envs: int,
    model: str | os.PathLike[str] | None = None,
    monitor: bool = False,
    **kwargs: Any,
) -> VecEnv:
    """``DenoisingSB3VecEnv(num_envs, model=model, **kwargs)``; with ``monitor=True``, monitored raw rewards.

    ``monitor=True`` builds ``NormalizeTerminalReward(VecMonitor(DenoisingSB3VecEnv(..., reward_normalization=
    "none")), reward_normalization)``: ``VecMonitor`` reports the raw rewards, the algorithm trains on the
    normalised ones (the adapter's ``reward_normalization``, ``stat_buffer_size``, ``stat_min_count`` and
    ``adv_clip_max`` go to the outer wrapper).
    """
    if not monitor:
        return DenoisingSB3VecEnv(num_envs=num_envs, model=model, **kwargs)
    normalization = {
        key: kwargs.pop(key)
        for key in ("reward_normalization", "stat_buffer_size", "stat_min_count", "adv_clip_max")
        if key in kwargs
    }
    mode = normalization.pop("reward_normalization", "per_prompt")
    monitored = VecMonitor(DenoisingSB3VecEnv(num_envs=num_envs, model=model, reward_normalization="none", **kwargs))
    return monitored if mode == "none" else NormalizeTerminalReward(monitored, mode, **normalization)


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
