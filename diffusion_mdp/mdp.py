"""The denoising MDP itself (DDPO, section 4.1), batched over N independent episodes.

    state    s_t = (c, t, x_t)          prompt, timestep, latent
    action   a_t = x_{t-1}              the next latent, chosen by the policy π_θ(x_{t-1} | x_t, c)
    transition  s_{t+1} = (c, t - Δ, a_t)   deterministic: the action *is* the next latent
    start    s_0 = (c ~ p(c), t_T, x_T ~ N(0, I))
    reward   r(s_t, a_t) = r(x_0, c) after the last step, 0 before it

This module owns the dynamics — the schedule of timesteps, the initial noise, the prompt distribution,
the VAE decode and the reward call — and nothing of the policy: the UNet lives in
:class:`diffusion_mdp.policy.DiffusionPolicy`. The Gymnasium environments (``DenoisingEnv``,
``DenoisingVectorEnv``) are thin adapters around it, so one environment and a batch of N share one
implementation. All N episodes advance in lockstep (every episode has exactly ``num_steps`` steps), which is
what makes one VAE decode and one reward call per batch possible.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusion_mdp.families import make_schedule
from diffusion_mdp.models import DiffusionComponents, load_components
from diffusion_mdp.prompts import PromptSet, load_prompts
from diffusion_mdp.rewards import RewardError, RewardFn, make_reward  # RewardError: re-exported here

# Finite bounds of the latent Box space. Gaussian latents never come near them; they exist because
# Gymnasium and RL libraries expect finite bounds.
LATENT_BOUND = 1e4
DEFAULT_REWARD = "jpeg_compressibility"


class EpisodeEndedError(RuntimeError):
    """``step`` was called after the episode ended, without ``reset``."""


def decode_latents(vae: Any, latents: Tensor) -> np.ndarray:
    """Decode latents x_0 with the VAE into uint8 images.

    Args:
        vae: A diffusers ``AutoencoderKL``.
        latents: ``(B, C, h, w)`` latents in the UNet's scale.

    Returns:
        ``uint8`` array ``(B, H, W, 3)``, rounding ``(x + 1) / 2 * 255`` as the authors' code does.
    """
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        pixels = vae.decode(latents.to(vae.dtype) / scaling + shift).sample
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def encode_images(vae: Any, images: np.ndarray | Tensor) -> Tensor:
    """Encode uint8 images with the VAE into latents in the UNet's scale: the inverse of :func:`decode_latents`.

    Args:
        vae: A diffusers ``AutoencoderKL``.
        images: ``uint8`` ``(B, H, W, 3)``.

    Returns:
        ``(B, C, h, w)`` float32: the posterior mean, shifted and scaled as the model's training data was.

    >>> from diffusion_mdp.testing import build_reference_tiny_pipeline
    >>> import tempfile
    >>> from diffusers import AutoencoderKL
    >>> vae = AutoencoderKL.from_pretrained(build_reference_tiny_pipeline(tempfile.mkdtemp()) / "vae")
    >>> encode_images(vae, np.zeros((2, 64, 64, 3), np.uint8)).shape
    torch.Size([2, 4, 32, 32])
    """
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    device = next(vae.parameters()).device
    pixels = torch.as_tensor(np.asarray(images), device=device).permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1.0
    with torch.no_grad():
        return ((vae.encode(pixels).latent_dist.mean - shift) * scaling).float()


def _checked_device(device: torch.device | str) -> torch.device:
    """``torch.device(device)``, or a ValueError saying what to pass (a device whose backend is missing, too)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"device={device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:<index>' or 'mps'"
        ) from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available in this environment: use device='cpu'")
    return parsed


class DenoisingMDP:
    """N denoising episodes advancing in lockstep.

    Args:
        num_envs: N, the number of episodes in the batch.
        model: ``"tiny-shapes"``/None (bundled), a pipeline folder, or a hub id (see ``load_components``).
        reward: A reward name, callable or ``{name: weight}`` dict (see ``make_reward``).
        prompts: A prompt-set name, list, text file or ``PromptSet``; None: the model's default set.
        num_steps: T, the number of denoising steps (episode length).
        eta: DDIM η of the policy's steps, or for SD3 / FLUX the flow SDE's noise level a (recorded in the
            schedule the policy reads). η in (0, 1] for training (the actions need a density); η = 0 makes an
            *evaluation* MDP: deterministic sampling, whose actions are the Gaussian's mean ``schedule.mean(...)``
            and have no log-probability.
        device: Where latents live (the policy's device).
        components: Already loaded components to share (skips loading ``model``).
        reward_kwargs: Keyword arguments for a named reward's factory (e.g. ``{"device": "cuda"}``).
        defer_reward: Do not call the reward at the last step: it returns zero rewards and ``info`` holds the
            batch's ``image``, ``prompt`` and ``metadata``, to be scored later with :meth:`score` (agents score
            in a background executor, overlapping the next batch's sampling).
    """

    def __init__(
        self,
        num_envs: int = 1,
        model: str | os.PathLike[str] | None = None,
        reward: str | RewardFn | Mapping[str, float] = DEFAULT_REWARD,
        prompts: str | os.PathLike[str] | Sequence[str] | PromptSet | None = None,
        num_steps: int = 20,
        eta: float = 1.0,
        device: torch.device | str = "cpu",
        components: DiffusionComponents | None = None,
        reward_kwargs: Mapping[str, Any] | None = None,
        defer_reward: bool = False,
    ) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if not 0 <= eta <= 1:
            raise ValueError(
                f"eta must be > 0 and <= 1, got {eta} (or exactly 0 for a deterministic evaluation MDP): η > 0 makes "
                "the policy stochastic (the MDP's actions need a density); η > 1 makes the DDIM variance exceed the "
                "noise level and the sample diverge to NaN"
            )
        self.num_envs = num_envs
        self.device = _checked_device(device)
        self.components = components if components is not None else load_components(model, device=self.device)
        if prompts is None:
            prompts = self.components.default_prompts or "imagenet_animals"
        self.prompts = load_prompts(prompts)
        self.reward_fn = make_reward(reward, **dict(reward_kwargs or {}))
        self.reward_name = reward if isinstance(reward, str) else getattr(reward, "__name__", repr(reward))
        # DDIM (η = eta) for UNet models; the flow SDE (noise level a = eta) for SD3 / FLUX.
        self.schedule = make_schedule(self.components, num_steps, eta)
        self.latent_shape = self.components.latent_shape
        self.image_size = self.components.image_size

        # Episode state: step k in [0, T], x_t (N, C, h, w), and the prompt index of each episode.
        self.step_index = 0
        self.latents = torch.zeros((num_envs, *self.latent_shape), device=self.device)
        self.prompt_ids = np.zeros(num_envs, dtype=np.int64)
        self.needs_reset = True
        self.defer_reward = bool(defer_reward)

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def timestep(self) -> int:
        """Diffusion timestep t of the current state (0 once the episode is over)."""
        if self.step_index >= self.num_steps:
            return 0
        return int(self.schedule.timesteps[self.step_index])

    @property
    def prompt_list(self) -> list[str]:
        return [self.prompts.prompts[i] for i in self.prompt_ids]

    def reset(
        self,
        rngs: Sequence[np.random.Generator],
        env_ids: Sequence[int] | None = None,
        prompt_ids: Sequence[int] | None = None,
        noise: Tensor | np.ndarray | None = None,
    ) -> None:
        """Start new episodes: c ~ p(c) and x_T ~ N(0, I), drawn with each episode's own generator.

        Each episode's prompt index and noise seed come from its own NumPy generator, in that order, so a
        batch of N episodes reproduces N single environments seeded alike. The noise itself is drawn on the
        CPU (the same numbers on every device), then moved to ``device``.

        Args:
            rngs: One generator per episode in ``env_ids``.
            env_ids: Which episodes to reset (all by default; all episodes share one step counter, so a
                partial reset is only allowed at the start or end of an episode).
            prompt_ids: Optional prompt index per episode, overriding the drawn one (e.g. k episodes per
                prompt for group advantages). The generators draw as usual, so the noise is unchanged.
            noise: Optional x_T per episode, ``(len(env_ids), C, h, w)``, instead of the drawn noise (fixed
                noise for evaluation). The generators draw as usual, so later episodes are unchanged.

        Raises:
            ValueError: Wrong number of generators, prompt ids or noises, a prompt id outside the set, or a
                noise of the wrong shape or with NaN/inf.
        """
        env_ids = list(range(self.num_envs)) if env_ids is None else list(env_ids)
        if len(rngs) != len(env_ids):
            raise ValueError(f"{len(env_ids)} episodes to reset but {len(rngs)} generators")
        if prompt_ids is not None and len(prompt_ids) != len(env_ids):
            raise ValueError(f"{len(env_ids)} episodes to reset but {len(prompt_ids)} prompt ids")
        if noise is not None:
            noise = torch.as_tensor(noise, dtype=torch.float32)
            expected = (len(env_ids), *self.latent_shape)
            if tuple(noise.shape) != expected:
                raise ValueError(f"reset noise must have shape {expected} (one x_T per episode), got {noise.shape}")
            if not bool(torch.isfinite(noise).all()):
                raise ValueError("reset noise contains NaN or inf")
        for i, (env_id, rng) in enumerate(zip(env_ids, rngs, strict=True)):
            self.prompt_ids[env_id] = self.prompts.sample(rng)
            if prompt_ids is not None:
                if not 0 <= int(prompt_ids[i]) < len(self.prompts):
                    last = len(self.prompts) - 1
                    raise ValueError(f"prompt id {prompt_ids[i]} is outside the prompt set's 0..{last}")
                self.prompt_ids[env_id] = int(prompt_ids[i])
            noise_seed = int(rng.integers(2**63 - 1))
            if noise is not None:
                self.latents[env_id] = noise[i].to(self.device)
            else:
                x_T = torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(noise_seed))
                self.latents[env_id] = x_T.to(self.device)
        self.step_index = 0
        self.needs_reset = False

    def validate_actions(self, actions: Tensor | np.ndarray) -> Tensor:
        """Check an action batch and return it as a float32 tensor on ``device``.

        Raises:
            EpisodeEndedError: The episode is over and ``reset`` was not called.
            ValueError: Wrong shape, a non-floating dtype, or NaN/inf values.
        """
        if self.needs_reset:
            raise EpisodeEndedError(
                "step() called before reset() or after the episode ended: call reset() to start an episode"
            )
        expected = (self.num_envs, *self.latent_shape)
        if tuple(actions.shape) != expected:
            raise ValueError(f"action must have shape {expected} (the next latent x_{{t-1}}), got {actions.shape}")
        if isinstance(actions, np.ndarray):
            if not np.issubdtype(actions.dtype, np.floating):
                raise ValueError(f"action must be a floating-point latent, got dtype {actions.dtype}")
            actions = torch.from_numpy(np.ascontiguousarray(actions))
        elif not isinstance(actions, Tensor):
            raise TypeError(f"action must be a numpy array or torch tensor, got {type(actions).__name__}")
        elif not actions.is_floating_point():
            raise ValueError(f"action must be a floating-point latent, got dtype {actions.dtype}")
        actions = actions.detach().to(device=self.device, dtype=torch.float32)
        if not bool(torch.isfinite(actions).all()):
            raise ValueError("action contains NaN or inf; the policy's sample diverged")
        return actions

    def step(self, actions: Tensor | np.ndarray) -> tuple[np.ndarray, bool, dict[str, Any]]:
        """Apply a_t = x_{t-1}: the next state's latent is the action (a deterministic transition).

        Args:
            actions: ``(N, C, h, w)`` next latents.

        Returns:
            ``(rewards (N,) float64, terminated, info)``. Rewards are 0 until the last step; then the batch's
            x_0 is decoded once and the reward called once, and ``info`` holds ``image`` (uint8
            ``(N, H, W, 3)``), ``reward_info`` and ``prompt``.
        """
        actions = self.validate_actions(actions)
        self.latents = actions.clone()
        self.step_index += 1
        if self.step_index < self.num_steps:
            return np.zeros(self.num_envs), False, {}
        self.needs_reset = True
        images = decode_latents(self.components.vae, self.latents)
        if self.defer_reward:
            metadata = [self.prompts.metadata[i] for i in self.prompt_ids]
            return np.zeros(self.num_envs), True, {"image": images, "prompt": self.prompt_list, "metadata": metadata}
        rewards, reward_info = self.score(images)
        return rewards, True, {"image": images, "reward_info": reward_info, "prompt": self.prompt_list}

    def score(
        self,
        images: np.ndarray,
        prompts: list[str] | None = None,
        metadata: list[dict[str, Any]] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Call the reward once on the batch, checking what it returns.

        ``prompts``/``metadata`` default to the current episodes'; pass them to score a batch later (deferred).

        Raises:
            RewardError: The reward raised, or did not return N finite numbers. The message names the
                reward and the batch's prompts.
        """
        prompts = self.prompt_list if prompts is None else list(prompts)
        metadata = [self.prompts.metadata[i] for i in self.prompt_ids] if metadata is None else list(metadata)
        return score_images(self.reward_fn, self.reward_name, images, prompts, metadata)


def score_images(
    reward_fn: RewardFn,
    reward_name: str,
    images: np.ndarray,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Call a reward once on a batch and check what it returns (the one validation of every reward call).

    Args:
        reward_fn: ``(images, prompts, metadata) -> (rewards, info)``.
        reward_name: Its name, for error messages.
        images: uint8 ``(B, H, W, 3)``.
        prompts, metadata: B each.

    Returns:
        ``(rewards (B,) float64, info)``.

    Raises:
        RewardError: The reward raised, or did not return B finite numbers. The message names the reward
            and the batch's prompts.
    """
    prompts, metadata = list(prompts), list(metadata)
    where = f"reward {reward_name!r} on a batch of {len(prompts)} images (prompts {prompts[:4]}...)"
    try:
        result = reward_fn(images, prompts, metadata)
    except Exception as exc:
        raise RewardError(f"{where} raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(result, tuple) and len(result) == 2):
        raise RewardError(f"{where} must return (rewards, info), got {type(result).__name__}")
    rewards, info = result
    if info is None or not isinstance(info, Mapping):
        raise RewardError(f"{where} must return (rewards, info) with info a dict (may be empty), got {info!r}")
    try:
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise RewardError(f"{where} returned rewards that are not numbers ({exc})") from exc
    if rewards.shape != (len(prompts),):
        raise RewardError(f"{where} returned {rewards.shape[0]} values for {len(prompts)} images")
    if not np.isfinite(rewards).all():
        bad = np.flatnonzero(~np.isfinite(rewards)).tolist()
        raise RewardError(f"{where} returned NaN/inf for samples {bad}")
    return rewards, dict(info)


def _single_threaded_after_fork() -> None:
    """In a forked child, run torch single-threaded.

    A child forked after torch ran an OpenMP parallel region in the parent (any UNet or VAE call) hangs in
    the next one: the OpenMP thread pool does not survive ``fork``. Gymnasium's ``AsyncVectorEnv`` forks its
    workers by default, so without this ``gym.make_vec(..., vectorization_mode="async")`` hangs forever. One
    thread per worker is also what N worker processes on N cores want.
    """
    torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_single_threaded_after_fork)
