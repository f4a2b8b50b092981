"""The shared base of every agent: :class:`DiffusionAgent`, everything but the loss.

An algorithm is a subclass of :class:`DiffusionAgent` that implements its loss on one step batch,
:meth:`DiffusionAgent.step_loss` (and, where it needs more than the advantages, :meth:`~DiffusionAgent.prepare_update`);
the one update loop over the filled :class:`DenoisingRolloutBuffer` is ``update.py`` (see ``ddpo_is.py``,
``ddpo_sf.py``, ``rwr.py``; each reads top to bottom). This module builds what an agent holds (the vector env
in fast torch mode, the policy, LoRA, AdamW, SB3 schedules, autocast, advantages, the buffer) and the numerics
shared by the losses; the class composes one module per purpose:

- ``rollouts.py`` (:class:`~.rollouts.RolloutMixin`): filling the buffer with an epoch's trajectories;
- ``epoch_loop.py`` (:class:`~.epoch_loop.EpochLoopMixin`): ``learn``, logging, Ctrl-C, ``finish``;
- ``evaluation.py`` (:class:`~.evaluation.EvaluationMixin`): held-out η = 0 evaluation, image grids;
- ``checkpointing.py`` (:class:`~.checkpointing.CheckpointMixin`): atomic checkpoints, keep-last-K, fallback;
- ``seeding.py``: the random streams per (seed, purpose, epoch, batch) and the RNG states a checkpoint keeps.

The names those modules define stay importable from here (``from diffusion_mdp.agents.base import ...``).

Reproducibility: every random draw of an epoch comes from generators seeded by ``(seed, epoch, batch)``
(env resets, policy noise, shuffling), so epoch e does the same thing whether the run was resumed or not;
the global torch/NumPy/Python RNG states and the env's generators are checkpointed as well.
"""

from __future__ import annotations

import contextlib
import copy
import signal
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.utils import FloatSchedule, LinearSchedule
from torch import Tensor

import diffusion_mdp  # noqa: F401  (registers DenoisingMDP-v0)
from diffusion_mdp.lora import LORA_TARGET_MODULES, add_lora, export_lora
from diffusion_mdp.models import DiffusionComponents
from diffusion_mdp.policy import DiffusionPolicy
from diffusion_mdp.prompts import PromptSet, load_prompts
from diffusion_mdp.rewards import make_reward
from diffusion_mdp.rewards.executor import AsyncReward

from .advantages import AdvantageNormalizer
from .buffer import DenoisingRolloutBuffer, StepBatch
from .checkpointing import (
    _EPOCH_FILE,  # noqa: F401  (re-exported)
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CheckpointError,
    CheckpointMixin,
    atomic_torch_save,
    checkpoint_candidates,
    checkpoint_path,
    find_checkpoint,
    from_weights_only,
    load_checkpoint_file,
    prompt_fingerprint,
    to_weights_only,
    upgrade_checkpoint,
)
from .config import ConfigError, TrainConfig
from .distributed import Distributed
from .epoch_loop import EpochLoopMixin, TrainingStopped
from .evaluation import EvaluationMixin, evaluation_env, run_deterministic, sample_deterministic
from .rollouts import RolloutMixin
from .seeding import SEED_TAGS, derived_seed, seed_global_rngs
from .update import run_update

if TYPE_CHECKING:
    from diffusion_mdp.envs.vector import DenoisingVectorEnv

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "LORA_TARGET_MODULES",
    "CheckpointError",
    "DiffusionAgent",
    "TrainingStopped",
    "add_lora",
    "atomic_torch_save",
    "checkpoint_candidates",
    "checkpoint_path",
    "derived_seed",
    "evaluation_env",
    "export_lora",
    "find_checkpoint",
    "from_weights_only",
    "load_checkpoint_file",
    "prompt_fingerprint",
    "resolve_autocast_dtype",
    "run_deterministic",
    "sample_deterministic",
    "to_weights_only",
    "upgrade_checkpoint",
]
_SEED_TAGS = SEED_TAGS  # the name the algorithm modules import


def resolve_autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``mixed_precision`` setting on ``device`` (None: full precision)."""
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16":
        return torch.float16
    if mixed_precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where the hardware does it natively
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    cpu_bf16 = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return torch.bfloat16 if cpu_bf16 else None


class DiffusionAgent(EpochLoopMixin, RolloutMixin, EvaluationMixin, CheckpointMixin):
    """Base class: everything but the loss. Subclasses set ``algorithm`` and implement ``step_loss``.

    Args:
        config: A validated :class:`TrainConfig`.
        components: Already loaded model components to use (tests share one load); None loads ``config.model``.
    """

    algorithm: ClassVar[str] = ""

    def __init__(self, config: TrainConfig, components: DiffusionComponents | None = None) -> None:
        self.config = cfg = config.validate()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        # Multi-process (accelerate launch): inert with one process; see agents/distributed.py.
        self.dist = Distributed.from_config(cfg)
        self._check_world_size()
        self.device = self.dist.device(cfg.device)
        self.run_dir = cfg.run_dir
        self.checkpoint_path = checkpoint_path(self.run_dir)

        # The reward first: an argument its factory refuses (reward_kwargs) is a config error, raised before any
        # sampling.
        try:
            reward = make_reward(cfg.reward, **self._reward_kwargs())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"reward={cfg.reward!r} with reward_kwargs={cfg.reward_kwargs!r}: {exc}") from exc
        # The vector env in fast mode: torch observations on the device, episodes end together.
        env = gym.make_vec(
            "DenoisingMDP-v0",
            num_envs=cfg.sample_batch_size,
            model=cfg.model,
            reward=reward,
            prompts=cfg.prompts or None,
            num_steps=cfg.num_steps,
            eta=cfg.eta,
            device=str(self.device),
            torch_obs=True,
            autoreset_mode="Disabled",
            components=components,
            defer_reward=cfg.async_reward,
        )
        self.env = cast("DenoisingVectorEnv", env)  # make_vec builds the registered vector env itself (no wrappers)
        self.mdp = self.env.unwrapped.mdp
        self.mdp.reward_name = cfg.reward  # built above, so the env saw a callable; errors name the config's reward
        # async_reward: the env defers the reward; batch b is scored in the background while b + 1 samples.
        self.reward_executor: AsyncReward | None = None
        # The η = 0 envs of evaluate(), per (batch size, steps).
        self._eval_envs: dict[tuple[int, int], DenoisingVectorEnv] = {}
        if cfg.async_reward:
            self.reward_executor = AsyncReward(self.mdp.score)  # mdp.score validates (N finite values)
        self.components = self.env.unwrapped.components
        self.train_prompts: PromptSet = self.mdp.prompts
        self.eval_prompts: PromptSet = load_prompts(cfg.eval_prompts) if cfg.eval_prompts else self.train_prompts
        self.policy = DiffusionPolicy.from_env(
            self.env, guidance_scale=cfg.guidance_scale, unconditional_gradient=cfg.unconditional_gradient
        )
        self.unet = self.policy.unet
        seed_global_rngs(cfg.seed)  # before anything draws from them (the LoRA initialisation does)
        if cfg.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if cfg.use_lora:
            add_lora(self.unet, cfg.lora_rank, cfg.lora_alpha)
        else:
            self.unet.requires_grad_(True)
        # π_ref of the KL penalty: with LoRA, the UNet with its adapter disabled (free); in full fine-tuning, a
        # frozen copy of the pre-trained UNet, made here, before any update or resumed checkpoint changes it
        # (one more UNet in memory, and one more forward per trained step).
        self.reference_unet: torch.nn.Module | None = None
        if cfg.kl_coef > 0 and not cfg.use_lora:
            self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()  # type: ignore[operator]
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.autocast_dtype = resolve_autocast_dtype(cfg.mixed_precision, self.device)
        self.optimizer = self._optimizer_class()(
            self.trainable,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        # DDP / FSDP (agents/distributed.py); the policy calls the prepared model, self.unet stays the model itself.
        self.policy.unet, self.optimizer = self.dist.prepare(self.unet, self.optimizer)
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]  # FSDP swapped them for shards
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        # SB3 schedules of progress_remaining (1 at the start, 0 at the end).
        self.lr_schedule = FloatSchedule(
            LinearSchedule(cfg.learning_rate, cfg.lr_end, 1.0) if cfg.lr_schedule == "linear" else cfg.learning_rate
        )
        self.clip_schedule = FloatSchedule(
            LinearSchedule(cfg.clip_range, cfg.clip_range_end, 1.0)
            if cfg.clip_range_schedule == "linear"
            else cfg.clip_range
        )
        self.normalizer = AdvantageNormalizer(
            cfg.advantage_mode, cfg.stat_buffer_size, cfg.stat_min_count, std_floor=cfg.adv_std_floor
        )
        length, width = self.policy.encode_prompts([""]).shape[1:]  # (L, D) of a prompt embedding
        embed_shape = (length, width)
        self.buffer = DenoisingRolloutBuffer(
            cfg.num_steps, cfg.samples_per_epoch, self.components.latent_shape, embed_shape, self.device
        )
        if self.dist.enabled:
            self.buffer.shard = self.dist.shard
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimizer steps
        self.scheduled_lr = cfg.learning_rate  # this epoch's learning rate (lr_schedule), before any warm-up
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.logger: Logger | None = None
        self._stop_requested = False
        self._stop_signal: int = signal.SIGINT
        self._saved_epoch: int | None = None  # epoch of the checkpoint at checkpoint_path, once known
        self._eval_pending = False  # a resumed run whose last evaluation was due but not done
        self.last_images: tuple[np.ndarray, list[str], np.ndarray] | None = None
        # The SDE window (sde_window_size > 0): this epoch's stochastic, trained steps (start, stop).
        self.base_schedule = self.policy.schedule
        self.window = (0, cfg.num_steps)

    def _reward_kwargs(self) -> dict[str, Any]:
        """What the reward is built with: a named reward's ``reward_kwargs``, or a reward server's timeout,
        retries and token (``reward = "http://..."``)."""
        cfg = self.config
        if not cfg.reward.startswith(("http://", "https://")):
            return cfg.reward_arguments
        return {"timeout": cfg.reward_timeout, "retries": cfg.reward_retries, "token": cfg.reward_token or None}

    def _optimizer_class(self) -> Callable[..., torch.optim.Optimizer]:
        """AdamW, or bitsandbytes' 8-bit AdamW with ``use_8bit_adam`` (same hyper-parameters)."""
        if not self.config.use_8bit_adam:
            return torch.optim.AdamW
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ConfigError(
                "use_8bit_adam=true needs bitsandbytes (pip install bitsandbytes); or set use_8bit_adam=false"
            ) from exc
        return bnb.optim.AdamW8bit

    def _check_world_size(self) -> None:
        """Multi-process runs split sample batches and minibatches evenly; say which setting to change."""
        cfg, world = self.config, self.dist.world_size
        num_batches = cfg.samples_per_epoch // cfg.sample_batch_size
        problems = []
        if num_batches % world:
            problems.append(
                f"samples_per_epoch / sample_batch_size = {num_batches} sample batches cannot be split over {world} "
                f"processes: make it a multiple of {world}"
            )
        if cfg.train_batch_size % world:
            problems.append(f"train_batch_size={cfg.train_batch_size} must be a multiple of the {world} processes")
        if problems:
            raise ConfigError("invalid config for a multi-process run: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------------
    # Hooks for algorithms: a loss on one step batch (the loop is agents/update.py, shared by all)
    # ------------------------------------------------------------------------------------------
    first_step_metrics: ClassVar[tuple[str, ...]] = ()  # stats logged from the epoch's first step only

    def train_on_rollouts(self, epoch: int) -> dict[str, float]:
        """Update the UNet from the filled buffer with :func:`~diffusion_mdp.agents.update.run_update`."""
        return run_update(self, epoch)

    def prepare_update(self, epoch: int) -> dict[str, float]:
        """Before the epoch's passes: fill what :meth:`step_loss` reads; return metrics to log as they are.

        By default the advantages A_t of every step (the run's ``advantage_mode``, clipped to ± adv_clip_max).
        """
        self.buffer.compute_returns_and_advantage(self.normalizer, self.config.adv_clip_max)
        return {}

    def step_loss(self, step: StepBatch, epoch: int) -> tuple[Tensor, Mapping[str, Tensor | float]]:
        """The algorithm's loss on one step batch (b trajectories, each at its own step) and its statistics."""
        raise NotImplementedError(f"{type(self).__name__} must implement step_loss(step, epoch)")

    def accumulation_steps(self, num_minibatches: int) -> int:
        """G, the minibatches whose gradients add up to one optimizer step (``gradient_accumulation_steps``)."""
        return self.config.gradient_accumulation_steps

    # ------------------------------------------------------------------------------------------
    # The SDE window (any algorithm): noise and training on a window of consecutive steps only
    # ------------------------------------------------------------------------------------------
    def window_for_epoch(self, epoch: int) -> tuple[int, int]:
        """``(start, stop)`` of the epoch's SDE window: ``sde_window_size`` consecutive steps starting at a step
        drawn uniformly from 0..``sde_window_max_start`` (seeded by (seed, epoch)); every step without one."""
        cfg = self.config
        if cfg.sde_window_size == 0:
            return (0, cfg.num_steps)
        last = cfg.sde_window_max_start if cfg.sde_window_max_start >= 0 else cfg.num_steps - cfg.sde_window_size
        rng = np.random.default_rng(derived_seed(cfg.seed, SEED_TAGS["window"], epoch))
        start = int(rng.integers(last + 1))
        return (start, start + cfg.sde_window_size)

    def collect_rollouts(self, epoch: int) -> dict[str, Any]:
        """The epoch's rollouts (:class:`~.rollouts.RolloutMixin`), stochastic on the SDE window only.

        With ``sde_window_size`` > 0 the sampler is stochastic (η, or the flow SDE's noise level) on the
        window's steps and deterministic elsewhere, so the trajectories branch, and the reward is credited,
        only there; :meth:`trained_steps` trains on the same steps.
        """
        self.window = self.window_for_epoch(epoch)
        if self.config.sde_window_size == 0:
            return super().collect_rollouts(epoch)
        start, stop = self.window
        self.policy.schedule = self.mdp.schedule = self.base_schedule.with_sde_window(start, stop - start)
        stats = super().collect_rollouts(epoch)
        return {**stats, "window_start": float(start)}

    def trained_steps(self, epoch: int) -> tuple[int, int] | None:
        """``(start, stop)``: the steps k the epoch trains on (its SDE window); None: all T steps."""
        return self.window if self.config.sde_window_size > 0 else None

    # ------------------------------------------------------------------------------------------
    # Numerics shared by algorithms
    # ------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed-precision context (the same for sampling and training, so ratios start at exactly 1)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def progress_remaining(self, epoch: int) -> float:
        """SB3's progress variable: 1 at the first epoch, → 0 at the end."""
        return 1.0 - epoch / self.config.num_epochs

    def current_clip_range(self, epoch: int) -> float:
        return self.clip_schedule(self.progress_remaining(epoch))

    def step_log_prob(self, batch: StepBatch) -> tuple[Tensor, Any]:
        """log π_θ(x_{t-1} | x_t, c) ``(b,)`` with gradients, and the step output (mean, std)."""
        with self.autocast():
            out = self.policy(batch.obs(), batch.next_latents)
        return out.log_prob, out

    def kl_to_reference(self, batch: StepBatch, out: Any) -> Tensor:
        """KL(π_θ ‖ π_ref) per sample ``(b,)`` at this step; π_ref is the pre-trained UNet: with LoRA, the UNet
        with its adapter disabled, in full fine-tuning the frozen copy ``reference_unet``.

        Both are Gaussians with the same σ_t, so KL = ‖μ_θ - μ_ref‖² / (2σ_t²), averaged over latent
        dimensions like the log-probs (the mean convention).
        """
        with torch.no_grad(), self.autocast(), self.reference_policy():
            ref = self.policy(batch.obs(), batch.next_latents)
        return ((out.mean - ref.mean) ** 2 / (2 * out.std**2)).mean(dim=(1, 2, 3))

    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[None]:
        """Inside, ``self.policy`` computes π_ref (the pre-trained UNet) instead of π_θ."""
        if self.reference_unet is None:
            self.unet.disable_adapters()  # type: ignore[operator]
            try:
                yield
            finally:
                self.unet.enable_adapters()  # type: ignore[operator]
            return
        trained = self.policy.unet
        self.policy.unet = self.reference_unet
        try:
            yield
        finally:
            self.policy.unet = trained

    def backward(self, loss: Tensor) -> None:
        self.dist.backward(self.scaler.scale(loss))

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Around one step's forward + backward: False keeps the gradient local (multi-process accumulation)."""
        return self.dist.gradient_sync(sync)

    def optimizer_step(self) -> float:
        """Unscale, clip the gradient norm, step AdamW, zero; returns the pre-clip norm (gradients are averaged
        over processes by DDP / FSDP in the last backward pass)."""
        if self.config.lr_warmup_steps:
            warmup = min(1.0, (self.global_step + 1) / self.config.lr_warmup_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = self.scheduled_lr * warmup
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm or float("inf")
        norm = self.dist.clip_grad_norm_(self.trainable, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return float(norm)

    def shuffle_generator(self, epoch: int, inner_epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(derived_seed(self.config.seed, SEED_TAGS["shuffle"], epoch, inner_epoch))
