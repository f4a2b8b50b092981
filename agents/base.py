"""Shared machinery of every agent: setup, rollouts, evaluation, checkpoints, logging, the epoch loop.

An algorithm is a subclass of :class:`DiffusionAgent` that implements its loss on one step batch,
:meth:`DiffusionAgent.step_loss` (and, where it needs more than the advantages, :meth:`~DiffusionAgent.prepare_update`);
the one update loop over the filled :class:`DenoisingRolloutBuffer` is ``update.py`` (see ``ddpo_is.py``,
``ddpo_sf.py``, ``rwr.py``; each reads top to bottom). Everything else — the
vector env in fast torch mode, the policy, LoRA, AdamW, SB3 schedules and logger, autocast, advantages,
atomic checkpoints with RNG states, held-out evaluation, image grids and the reward plot — lives here once.

Reproducibility: every random draw of an epoch comes from generators seeded by ``(seed, epoch, batch)``
(env resets, policy noise, shuffling), so epoch e does the same thing whether the run was resumed or not;
the global torch/NumPy/Python RNG states and the env's generators are checkpointed as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.utils import FloatSchedule, LinearSchedule
from torch import Tensor

import diffusion_mdp  # noqa: F401  (registers DenoisingMDP-v0)
from diffusion_mdp.lora import LORA_TARGET_MODULES, add_lora, export_lora  # noqa: F401  (re-exported)
from diffusion_mdp.mdp import RewardError
from diffusion_mdp.models import DiffusionComponents
from diffusion_mdp.policy import DiffusionPolicy
from diffusion_mdp.prompts import PromptSet, load_prompts
from diffusion_mdp.rewards.executor import AsyncReward

from .advantages import AdvantageNormalizer
from .buffer import DenoisingRolloutBuffer, StepBatch
from .config import ConfigError, TrainConfig
from .distributed import Distributed, sync_rollout_buffer
from .update import run_update
from .visual import plot_rewards, save_grid

# Format 2: loadable with torch.load(weights_only=True) (tensors and plain data, NumPy arrays as tagged bytes),
# so opening someone else's run folder cannot execute code. Format 1 pickled NumPy objects.
CHECKPOINT_FORMAT = 2
CHECKPOINT_NAME = "last.pt"
_EPOCH_FILE = re.compile(r"epoch(\d+)\.pt")
_SEED_TAGS = {"env": 0, "noise": 1, "shuffle": 2, "group": 3, "train": 4, "eval": 5, "init": 6}


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (independent streams per (seed, epoch, batch, purpose))."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


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


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` atomically: a crash leaves either the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be opened (damaged, or of an older format); the message names the file and the fix."""


def to_weights_only(obj: Any) -> Any:
    """``obj`` with NumPy arrays, NumPy scalars and deques replaced by what ``torch.load(weights_only=True)`` reads.

    Arrays become ``{"__ndarray__": bytes, "dtype": str, "shape": list}``; :func:`from_weights_only` undoes it.
    """
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tobytes(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {key: to_weights_only(value) for key, value in obj.items()}
    if isinstance(obj, list | deque):
        return [to_weights_only(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(to_weights_only(value) for value in obj)
    return obj


def from_weights_only(obj: Any) -> Any:
    """The inverse of :func:`to_weights_only` (tagged arrays back to ``np.ndarray``)."""
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__", "dtype", "shape"}:
            return np.frombuffer(obj["__ndarray__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        return {key: from_weights_only(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [from_weights_only(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(from_weights_only(value) for value in obj)
    return obj


def load_checkpoint_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Open a checkpoint without executing code (``weights_only=True``); returns its state dict.

    Raises:
        CheckpointError: The file is missing, truncated or damaged, or of an older format (the message
            says how to convert it if you trust it).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, weights_only=True, map_location=map_location)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in str(exc) or "weights_only" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects (an older diffusion-mdp format, or a file not "
                "written by diffusion-mdp); opening it could run arbitrary code, so it is refused. If you trust "
                f"it, convert it once: python -c \"from diffusion_mdp.agents.base import upgrade_checkpoint; "
                f"upgrade_checkpoint('{path}')\""
            ) from exc
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({type(exc).__name__}: {reason})") from exc
    if not isinstance(state, dict) or "epoch" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a diffusion-mdp checkpoint (no epoch/config entries)")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {state.get('format')!r}; this diffusion-mdp reads format "
            f"{CHECKPOINT_FORMAT}: convert it with diffusion_mdp.agents.base.upgrade_checkpoint if you trust it"
        )
    return from_weights_only(state)


def upgrade_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Rewrite an older (pickled, format 1) checkpoint in the current format, in place. Only for trusted files:
    reading the old format unpickles arbitrary objects."""
    path = Path(path)
    state = torch.load(path, weights_only=False, map_location="cpu")
    state["format"] = CHECKPOINT_FORMAT
    atomic_torch_save(to_weights_only(state), path)
    return path


def checkpoint_candidates(run_dir: str | os.PathLike[str]) -> list[Path]:
    """A run's checkpoint files, newest first: ``checkpoints/last.pt``, then ``checkpoints/epoch<N>.pt``."""
    folder = Path(run_dir) / "checkpoints"
    older = [p for p in folder.glob("epoch*.pt") if _EPOCH_FILE.fullmatch(p.name)] if folder.is_dir() else []
    older.sort(key=lambda p: int(_EPOCH_FILE.fullmatch(p.name).group(1)), reverse=True)  # type: ignore[union-attr]
    last = folder / CHECKPOINT_NAME
    return ([last] if last.is_file() else []) + older


def find_checkpoint(
    run_dir: str | os.PathLike[str], map_location: Any = "cpu", warn: bool = True
) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint of a run and its state (None: the run has none).

    A damaged newest file is skipped, with a message on stderr (``warn``) naming it and the one used instead.

    Raises:
        CheckpointError: There are checkpoint files but none can be opened (each one's reason is listed).
    """
    reasons = []
    for path in checkpoint_candidates(run_dir):
        try:
            state = load_checkpoint_file(path, map_location)
        except CheckpointError as exc:
            reasons.append(str(exc))
            continue
        if reasons and warn:
            print(
                f"warning: {'; '.join(reasons)}. Falling back to the newest intact checkpoint: {path} "
                f"(epoch {state['epoch']})",
                file=sys.stderr,
            )
        return path, state
    if reasons:
        raise CheckpointError("no usable checkpoint in " + f"{Path(run_dir) / 'checkpoints'}: " + "; ".join(reasons))
    return None


def prompt_fingerprint(prompts: PromptSet) -> str:
    """SHA-256 of a prompt set's prompts, in order (what a resumed run must find unchanged)."""
    return hashlib.sha256("\n".join(prompts.prompts).encode()).hexdigest()


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on a signal (Ctrl-C, SIGTERM, SIGHUP); ``signum`` says which."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


class DiffusionAgent:
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
        self.checkpoint_path = self.run_dir / "checkpoints" / "last.pt"

        # The vector env in fast mode: torch observations on the device, episodes end together.
        self.env = gym.make_vec(
            "DenoisingMDP-v0",
            num_envs=cfg.sample_batch_size,
            model=cfg.model,
            reward=cfg.reward,
            prompts=cfg.prompts or None,
            num_steps=cfg.num_steps,
            eta=cfg.eta,
            device=str(self.device),
            torch_obs=True,
            autoreset_mode="Disabled",
            components=components,
            reward_kwargs=self._remote_reward_kwargs(),
            defer_reward=cfg.async_reward,
        )
        self.mdp = self.env.unwrapped.mdp
        # async_reward: the env defers the reward; batch b is scored in the background while b + 1 samples.
        self.reward_executor: AsyncReward | None = None
        self._eval_envs: dict[tuple[int, int], Any] = {}  # η = 0 envs of evaluate(), per (batch size, steps)
        if cfg.async_reward:
            self.reward_executor = AsyncReward(self.mdp.score)  # mdp.score validates (N finite values)
        self.components = self.env.unwrapped.components
        self.train_prompts: PromptSet = self.mdp.prompts
        self.eval_prompts: PromptSet = load_prompts(cfg.eval_prompts) if cfg.eval_prompts else self.train_prompts
        self.policy = DiffusionPolicy.from_env(self.env, guidance_scale=cfg.guidance_scale)
        self.unet = self.policy.unet
        # Seed the global RNGs before anything draws from them (the LoRA initialisation does): two runs with
        # the same seed start from the same weights whatever ran before in the process.
        torch.manual_seed(derived_seed(cfg.seed, _SEED_TAGS["init"]))
        np.random.seed(derived_seed(cfg.seed, _SEED_TAGS["init"]) % 2**32)
        random.seed(derived_seed(cfg.seed, _SEED_TAGS["init"]))
        if cfg.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if cfg.use_lora:
            add_lora(self.unet, cfg.lora_rank, cfg.lora_alpha)
        else:
            self.unet.requires_grad_(True)
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
        embed_shape = tuple(self.policy.encode_prompts([""]).shape[1:])
        self.buffer = DenoisingRolloutBuffer(
            cfg.num_steps, cfg.samples_per_epoch, self.components.latent_shape, embed_shape, self.device
        )
        if self.dist.enabled:
            self.buffer.shard = self.dist.shard
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimizer steps
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.logger: Logger | None = None
        self._stop_requested = False
        self._stop_signal: int = signal.SIGINT
        self._saved_epoch: int | None = None  # epoch of the checkpoint at checkpoint_path, once known
        self._eval_pending = False  # a resumed run whose last evaluation was due but not done
        self.last_images: tuple[np.ndarray, list[str], np.ndarray] | None = None

    def _remote_reward_kwargs(self) -> dict[str, Any] | None:
        """Timeout, retries and token of a reward server (``reward = "http://..."``); None for a local reward."""
        cfg = self.config
        if not cfg.reward.startswith(("http://", "https://")):
            return None
        return {"timeout": cfg.reward_timeout, "retries": cfg.reward_retries, "token": cfg.reward_token or None}

    def _optimizer_class(self) -> type[torch.optim.Optimizer]:
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

    def trained_steps(self, epoch: int) -> tuple[int, int] | None:
        """``(start, stop)``: the steps k the epoch trains on (a window of them); None: all T steps."""
        return None

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
        """KL(π_θ ‖ π_ref) per sample ``(b,)`` at this step, π_ref = the UNet without its LoRA adapter.

        Both are Gaussians with the same σ_t, so KL = ‖μ_θ - μ_ref‖² / (2σ_t²), averaged over latent
        dimensions like the log-probs (the mean convention).
        """
        self.unet.disable_adapters()  # type: ignore[operator]
        try:
            with torch.no_grad(), self.autocast():
                ref = self.policy(batch.obs(), batch.next_latents)
        finally:
            self.unet.enable_adapters()  # type: ignore[operator]
        return ((out.mean - ref.mean) ** 2 / (2 * out.std**2)).mean(dim=(1, 2, 3))

    def backward(self, loss: Tensor) -> None:
        self.dist.backward(self.scaler.scale(loss))

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Around one step's forward + backward: False keeps the gradient local (multi-process accumulation)."""
        return self.dist.gradient_sync(sync)

    def optimizer_step(self) -> float:
        """Unscale, clip the gradient norm, step AdamW, zero; returns the pre-clip norm (gradients are averaged
        over processes by DDP / FSDP in the last backward pass)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm or float("inf")
        norm = self.dist.clip_grad_norm_(self.trainable, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return float(norm)

    def shuffle_generator(self, epoch: int, inner_epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(derived_seed(self.config.seed, _SEED_TAGS["shuffle"], epoch, inner_epoch))

    # ------------------------------------------------------------------------------------------
    # Rollouts
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect_rollouts(self, epoch: int) -> dict[str, Any]:
        """Fill the buffer with ``samples_per_epoch`` trajectories of the current policy (see ``_collect_rollouts``)."""
        with self._sampling_weights():
            return self._collect_rollouts(epoch)

    @contextlib.contextmanager
    def _sampling_weights(self) -> Iterator[None]:
        """With ``merge_lora_for_sampling``: the LoRA merged into its base weights, which are restored after."""
        if not (self.config.merge_lora_for_sampling and self.config.use_lora):
            yield
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
        for layer in layers:
            layer.merge()
        try:
            yield
        finally:  # restore the exact base weights: unmerging (W + BA) - BA would drift by rounding every epoch
            for layer, weight in zip(layers, saved, strict=True):
                layer.get_base_layer().weight.data.copy_(weight)
                layer.merged_adapters.clear()

    def _collect_rollouts(self, epoch: int) -> dict[str, Any]:
        """Fill the buffer with ``samples_per_epoch`` trajectories of the current policy; return reward stats.

        Raises:
            RewardError: The reward failed; the message names the reward, the batch, and the intact checkpoint.
        """
        cfg, buffer = self.config, self.buffer
        buffer.reset()
        num_batches = cfg.samples_per_epoch // cfg.sample_batch_size
        images, prompts = [], []
        pending = []  # async_reward: (batch, its reward future)
        for b in self.dist.local_batches(num_batches):  # all of them with one process
            options = None
            group_ids = np.arange(b * cfg.sample_batch_size, (b + 1) * cfg.sample_batch_size)
            if cfg.advantage_mode == "group":
                # k samples per prompt: N / k prompts drawn per batch, each repeated k times.
                rng = np.random.default_rng(derived_seed(cfg.seed, _SEED_TAGS["group"], epoch, b))
                chosen = rng.integers(len(self.train_prompts), size=cfg.sample_batch_size // cfg.group_size)
                options = {"prompt_ids": np.repeat(chosen, cfg.group_size)}
                group_ids = b * cfg.sample_batch_size + np.repeat(np.arange(len(chosen)), cfg.group_size)
            seed = derived_seed(cfg.seed, _SEED_TAGS["env"], epoch, b) % 2**31
            obs, info = self.env.reset(seed=seed, options=options)
            generator = torch.Generator(self.device).manual_seed(derived_seed(cfg.seed, _SEED_TAGS["noise"], epoch, b))
            batch_prompts = list(info["prompt"])  # the observations hold prompt ids; the texts come in info
            obs["prompt"], obs["prompt_embeds"] = batch_prompts, self.policy.encode_prompts(batch_prompts)
            obs["group_id"] = group_ids
            terminated = np.zeros(cfg.sample_batch_size, dtype=bool)
            while not terminated.all():
                with self.autocast():
                    actions, log_probs = self.policy.sample(obs, generator=generator)
                try:
                    next_obs, rewards, terminated, _, info = self.env.step(actions)
                except RewardError as exc:
                    saved = self._save_unscored_samples(epoch, b, actions, list(obs["prompt"]))
                    raise RewardError(
                        f"epoch {epoch + 1}, sample batch {b + 1}/{num_batches}: {exc}. This epoch's samples so "
                        f"far are saved in {saved}; the last checkpoint ({self._checkpoint_note()}) is intact."
                    ) from exc
                buffer.add(obs, actions, rewards, log_prob=log_probs, block_start=b * cfg.sample_batch_size)
                next_obs["prompt"], next_obs["prompt_embeds"] = batch_prompts, obs["prompt_embeds"]
                next_obs["group_id"] = group_ids
                obs = next_obs
            images.append(info["image"])
            prompts.extend(info["prompt"])
            if self.reward_executor is not None:
                pending.append((b, self.reward_executor.submit(info["image"], batch_prompts, info["metadata"])))
        for b, future in pending:  # the terminal rewards, into the last step of each trajectory
            try:
                values, _ = future.result()
            except RewardError as exc:
                saved = self._save_unscored_samples(epoch, None, None, [])
                raise RewardError(
                    f"epoch {epoch + 1}, sample batch {b + 1}/{num_batches}: {exc}. This epoch's samples are "
                    f"saved in {saved}; the last checkpoint ({self._checkpoint_note()}) is intact."
                ) from exc
            rows = slice(b * cfg.sample_batch_size, (b + 1) * cfg.sample_batch_size)
            buffer.rewards[rows, -1] = torch.as_tensor(values, device=buffer.device, dtype=torch.float64)
        rewards = buffer.episode_rewards.cpu().numpy()
        if self.dist.enabled:  # every process gets the whole epoch: global rewards, prompts, advantages
            size = cfg.sample_batch_size
            rows = [r for b in self.dist.local_batches(num_batches) for r in range(b * size, (b + 1) * size)]
            sync_rollout_buffer(self.dist, buffer, rows)
            self.last_images = (np.concatenate(images), prompts, rewards[rows])  # this process's own samples
            rewards = buffer.episode_rewards.cpu().numpy()
        else:
            self.last_images = (np.concatenate(images), prompts, rewards)
        return {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "reward_min": float(rewards.min()),
            "reward_max": float(rewards.max()),
        }

    def _save_unscored_samples(
        self, epoch: int, failed_batch: int | None, failed_latents: Tensor | None, failed_prompts: list[str]
    ) -> Path:
        """Keep an epoch's samples when its reward fails, so that no sampling work is lost.

        Writes ``<run>/failed_rewards/epoch<e>.pt`` (atomically) with the x_0 latents ``(n, C, h, w)`` and
        prompts of every trajectory sampled so far (the buffer's complete batches, plus the batch whose
        reward failed): decode them with the VAE and score them once the reward works again.
        """
        cfg, buffer = self.config, self.buffer
        done = buffer.block_start  # trajectories of complete batches in the buffer
        latents = [buffer.final_latents[:done].cpu()]
        prompts = list(buffer.prompts[:done])
        if failed_latents is not None:
            latents.append(failed_latents.detach().float().cpu())
            prompts.extend(failed_prompts)
        path = self.run_dir / "failed_rewards" / f"epoch{epoch + 1}.pt"
        payload = {"latents": torch.cat(latents), "prompts": prompts, "epoch": epoch + 1, "batch": failed_batch}
        payload["reward"] = cfg.reward
        atomic_torch_save(payload, path)
        return path

    def _checkpoint_note(self) -> str:
        if self.checkpoint_path.is_file():
            epoch = self._saved_epoch
            if epoch is None:
                with contextlib.suppress(CheckpointError):
                    epoch = load_checkpoint_file(self.checkpoint_path)["epoch"]
            return f"{self.checkpoint_path}, epoch {epoch if epoch is not None else '?'}"
        return "none written yet"

    # ------------------------------------------------------------------------------------------
    # Evaluation: deterministic DDIM (η = 0) from fixed noise on held-out prompts
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, num_samples: int | None = None) -> dict[str, Any]:
        """Render ``num_samples`` held-out images with η = 0 from fixed seeds and score them.

        The episodes run through an η = 0 copy of the training env (same model, same reward and its
        validation), with fixed noise and prompts given as reset options: see :func:`run_deterministic`.

        Returns:
            ``{"eval_reward_mean", "eval_reward_std", "images" (B, H, W, 3), "prompts", "rewards" (B,)}``.
        """
        cfg = self.config
        num_samples = num_samples or cfg.eval_num_samples
        rng = np.random.default_rng(derived_seed(cfg.seed, _SEED_TAGS["eval"]))
        order = rng.permutation(len(self.eval_prompts))
        ids = np.resize(order, num_samples)  # every prompt once before any repeats
        generator = torch.Generator().manual_seed(derived_seed(cfg.seed, _SEED_TAGS["eval"], 1))
        noise = torch.randn((num_samples, *self.components.latent_shape), generator=generator)
        images, rewards = [], []
        for start in range(0, num_samples, cfg.sample_batch_size):
            batch_ids = ids[start : start + cfg.sample_batch_size]
            env = self.evaluation_env(self.eval_prompts, len(batch_ids))
            try:
                batch_images, values, _ = run_deterministic(
                    env, self.policy, noise[start : start + len(batch_ids)], batch_ids, self.autocast
                )
            except RewardError as exc:
                raise RewardError(f"held-out evaluation: {exc}") from exc
            images.append(batch_images)
            rewards.append(values)
        all_rewards = np.concatenate(rewards)
        prompts = [self.eval_prompts.prompts[i] for i in ids]
        return {
            "eval_reward_mean": float(all_rewards.mean()),
            "eval_reward_std": float(all_rewards.std()),
            "images": np.concatenate(images),
            "prompts": prompts,
            "rewards": all_rewards,
        }

    def evaluation_env(self, prompts: PromptSet, num_envs: int, num_steps: int | None = None) -> Any:
        """The η = 0 vector env of :meth:`evaluate` on ``prompts`` (cached): the training env's model and reward."""
        num_steps = num_steps or self.config.num_steps
        key = (num_envs, num_steps)
        cached = self._eval_envs.get(key)
        if cached is None or cached.unwrapped.mdp.prompts is not prompts:
            cached = evaluation_env(self.components, prompts, num_envs, num_steps, self.mdp.reward_fn, self.device)
            self._eval_envs[key] = cached
        return cached

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly."""
        return {
            "format": CHECKPOINT_FORMAT,
            "algorithm": self.algorithm,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "trainable": self.dist.trainable_state(self.unet),  # gathered from the shards under FSDP (collective)
            "optimizer": self.dist.optimizer_state(self.unet, self.optimizer),
            "scaler": self.scaler.state_dict(),
            "normalizer": self.normalizer.state_dict(),
            "history": self.history,
            "eval_history": self.eval_history,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "env": self.env.unwrapped.get_rng_state(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"unsupported checkpoint format {state.get('format')!r} (this version reads {CHECKPOINT_FORMAT})"
            )
        params = dict(self.unet.named_parameters())
        missing = [n for n in state["trainable"] if n not in params]
        if missing:
            raise ValueError(f"checkpoint has weights this model lacks: {missing[:3]} (LoRA vs full fine-tuning?)")
        if bool(state.get("sharded", False)) != self.dist.sharded:  # optimizer states keyed by name vs by index
            fix = "'fsdp'" if state.get("sharded") else "'ddp' (or one process)"
            raise CheckpointError(f"the checkpoint was written under another distributed_strategy: resume with {fix}")
        if self.dist.sharded:
            self.dist.load_trainable(self.unet, self.optimizer, state["trainable"], state["optimizer"])
        else:
            with torch.no_grad():
                for name, value in state["trainable"].items():
                    params[name].copy_(value)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.normalizer.load_state_dict(state["normalizer"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history, self.eval_history = list(state["history"]), list(state["eval_history"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.env.unwrapped.set_rng_state(rng["env"])

    def save_checkpoint(self, eval_pending: bool = False) -> Path:
        """Write ``checkpoints/last.pt`` atomically, keeping the previous ones as ``epoch<N>.pt`` (the newest
        ``keep_checkpoints`` in all), so a damaged newest file still leaves one to resume from.

        Args:
            eval_pending: The evaluation of this epoch is due but runs after the save; a resume runs it first.
        """
        state = self.state_dict()
        if not self.dist.is_main:  # FSDP: the other processes only took part in gathering the state
            return self.checkpoint_path
        state["sharded"] = self.dist.sharded
        state["config"] = {**state["config"], "reward_token": ""}  # a secret: never written to the run folder
        state["eval_pending"] = bool(eval_pending)
        state["prompt_fingerprints"] = {
            "prompts": prompt_fingerprint(self.train_prompts),
            "eval_prompts": prompt_fingerprint(self.eval_prompts),
        }
        path = self.checkpoint_path
        folder = path.parent
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(to_weights_only(state), tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if path.is_file():  # keep the previous checkpoint under its epoch's name
            previous = self._saved_epoch
            if previous is None:
                try:
                    previous = int(load_checkpoint_file(path)["epoch"])
                except CheckpointError:
                    os.replace(path, folder / "unreadable-last.pt")  # kept for inspection, never resumed from
            if previous is not None and previous != self.epoch:
                os.replace(path, folder / f"epoch{previous:04d}.pt")
        os.replace(tmp, path)  # a crash before this line leaves epoch<previous>.pt, which resume falls back to
        self._saved_epoch = self.epoch
        for old in checkpoint_candidates(self.run_dir)[self.config.keep_checkpoints :]:
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Restore a checkpoint: ``path``, or the run's newest intact one (a damaged newest file is skipped with a
        message). Returns the file used.

        Raises:
            CheckpointError: No checkpoint, or none that can be opened.
        """
        # FSDP: the whole model's tensors go to the CPU (every process reads them) and are scattered to shards.
        where = "cpu" if self.dist.sharded else self.device
        if path is not None:
            used, state = Path(path), load_checkpoint_file(path, where)
        else:
            found = find_checkpoint(self.run_dir, where)
            if found is None:
                raise CheckpointError(f"no checkpoint in {self.run_dir / 'checkpoints'}")
            used, state = found
        self.load_state_dict(state)
        self._eval_pending = bool(state.get("eval_pending", False))
        if used == self.checkpoint_path:
            self._saved_epoch = self.epoch
        return used

    # ------------------------------------------------------------------------------------------
    # The epoch loop
    # ------------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Finish the current epoch, write a checkpoint, then stop (what Ctrl-C, SIGTERM and SIGHUP do)."""
        self._stop_requested = True

    @contextlib.contextmanager
    def _interrupt_handler(self) -> Iterator[None]:
        """First Ctrl-C / SIGTERM / SIGHUP: stop after this epoch with a checkpoint. Second: abort now (the last
        checkpoint is kept). SIGTERM is what cluster schedulers and ``timeout`` send at preemption.

        A signal whose handler is not the default (a framework's, or SIG_IGN under ``nohup``) is left alone.
        """
        defaults = {"SIGINT": signal.default_int_handler, "SIGTERM": signal.SIG_DFL, "SIGHUP": signal.SIG_DFL}
        signals = [getattr(signal, name) for name in defaults if hasattr(signal, name)]
        signals = [sig for sig in signals if signal.getsignal(sig) is defaults[signal.Signals(sig).name]]
        labels = {"SIGINT": "Ctrl-C"}

        def handler(signum: int, frame: Any) -> None:
            label = labels.get(signal.Signals(signum).name, signal.Signals(signum).name)
            if self._stop_requested:
                restore()
                raise TrainingStopped(
                    f"{label} again: aborted during epoch {self.epoch + 1}; the last checkpoint "
                    f"({self._checkpoint_note()}) is kept",
                    signum,
                )
            print(
                f"\n{label}: finishing this epoch, then saving a checkpoint ({label} again aborts without saving)",
                flush=True,
            )
            self._stop_signal = signum
            self.request_stop()

        installed: dict[int, Any] = {}

        def restore() -> None:
            for sig, previous in installed.items():
                signal.signal(sig, previous)
            installed.clear()

        try:
            for sig in signals:
                installed[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: signals cannot be handled here
            restore()
        try:
            yield
        finally:
            restore()

    def _setup_logger(self) -> Logger:
        formats = [f.strip() for f in self.config.log_formats.split(",") if f.strip()]
        if "tensorboard" in formats:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                print("tensorboard is not installed: logging without it (pip install tensorboard)")
                formats.remove("tensorboard")
        log_dir = self.run_dir / "logs"
        if self.epoch > 0 and (log_dir / "progress.csv").exists():  # SB3 truncates progress.csv: keep the old one
            (log_dir / "progress.csv").rename(log_dir / f"progress-until-epoch{self.epoch}.csv")
        return configure(str(log_dir), formats)

    def learn(self) -> dict[str, Any]:
        """Run epochs ``self.epoch + 1 .. num_epochs``; returns a summary (before/after evaluation rewards).

        Raises:
            KeyboardInterrupt: After Ctrl-C (or :meth:`request_stop`), once the checkpoint is written.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        main = self.dist.is_main  # multi-process: only the main process writes logs, images and checkpoints
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            saved_config = {**cfg.to_dict(), "reward_token": ""}  # a secret: never written to the run folder
            (self.run_dir / "config.json").write_text(json.dumps(saved_config, indent=2))
            self.logger = self._setup_logger()
        if self.epoch > 0 and main:  # resumed: metrics.jsonl may hold epochs after the checkpoint (a crash): rewrite
            lines = [json.dumps(metrics) + "\n" for metrics in self.history]
            (self.run_dir / "metrics.jsonl").write_text("".join(lines))
        # FSDP: forward passes are collective, so every process evaluates (the main one writes the results).
        evaluates = main or self.dist.sharded
        if self.epoch == 0 and not self.eval_history and cfg.eval_num_samples and evaluates:
            self._evaluate_in_loop(0)
        evaluated = {entry["epoch"] for entry in self.eval_history}
        if self._eval_pending and self.epoch not in evaluated and cfg.eval_num_samples and evaluates:
            self._evaluate_in_loop(self.epoch)  # due at the checkpoint's epoch, not done before it stopped
        self._eval_pending = False
        bar = tqdm(
            range(self.epoch, cfg.num_epochs),
            initial=self.epoch,
            total=cfg.num_epochs,
            desc=f"{self.algorithm} {cfg.name}",
            disable=not (cfg.progress_bar and main),
        )
        with self._interrupt_handler():
            for epoch in bar:
                lr = self.lr_schedule(self.progress_remaining(epoch))
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                metrics: dict[str, Any] = {"epoch": epoch + 1, **self.collect_rollouts(epoch)}
                t1 = time.perf_counter()
                metrics.update(self.dist.average_metrics(self.train_on_rollouts(epoch)))
                t2 = time.perf_counter()
                metrics["lr"] = lr
                metrics["global_step"] = self.global_step
                self.epoch = epoch + 1
                self.history.append(metrics)
                timing = {"time/sampling_s": t1 - t0, "time/training_s": t2 - t1}
                done = self.epoch == cfg.num_epochs
                # Stop together (Ctrl-C reaches the processes at different moments).
                self._stop_requested = self.dist.any_process(self._stop_requested)
                eval_due = bool(cfg.eval_num_samples) and (self.epoch % cfg.eval_every == 0 or done)
                if not main:
                    if self.dist.sharded:  # FSDP: gathering the checkpoint and evaluating are collective
                        if self.epoch % cfg.save_every == 0 or done or eval_due or self._stop_requested:
                            self.save_checkpoint(eval_pending=eval_due)
                        if eval_due and not self._stop_requested:
                            self._evaluate_in_loop(self.epoch)
                    if self._stop_requested:
                        raise KeyboardInterrupt(f"stopped after epoch {self.epoch} (rank {self.dist.rank})")
                    continue
                self._log(metrics, timing)
                bar.write(self._metrics_line(metrics, timing))
                if cfg.image_every and (self.epoch % cfg.image_every == 0 or done) and self.last_images is not None:
                    imgs, prompts, rewards = self.last_images
                    count = min(16, len(imgs))
                    save_grid(
                        imgs[:count],
                        [f"{p} | r={r:.3g}" for p, r in zip(prompts[:count], rewards[:count], strict=True)],
                        self.run_dir / "images" / f"samples_epoch{self.epoch:04d}.png",
                        title=f"training samples, epoch {self.epoch}",
                    )
                # Save before evaluating: an evaluation that fails (its reward) loses no trained epoch.
                if self.epoch % cfg.save_every == 0 or done or eval_due or self._stop_requested:
                    self.save_checkpoint(eval_pending=eval_due)
                if self._stop_requested:  # a due evaluation is left pending: the resumed run does it first
                    bar.close()
                    name = signal.Signals(self._stop_signal).name
                    raise TrainingStopped(
                        f"stopped after epoch {self.epoch} ({'Ctrl-C' if name == 'SIGINT' else name}); "
                        f"checkpoint {self.checkpoint_path}",
                        self._stop_signal,
                    )
                if eval_due:
                    self._evaluate_in_loop(self.epoch)
        bar.close()
        self.dist.barrier()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Final outputs: the LoRA (or full UNet) in diffusers format, the reward plot, summary.json."""
        if self.dist.sharded:  # FSDP (full fine-tuning): every process takes part in gathering the UNet
            self.dist.save_full_model(self.unet, self.run_dir / "unet")
        if not self.dist.is_main:
            return {"epochs": self.epoch, "run_dir": str(self.run_dir), "rank": self.dist.rank}
        if self.config.use_lora:
            export_lora(self.unet, self.run_dir / "lora", str(getattr(self.components, "family", "sd")))
        elif not self.dist.sharded:  # full fine-tuning: the UNet, loadable with UNet2DConditionModel.from_pretrained
            self.unet.save_pretrained(self.run_dir / "unet")
        plot_rewards(self.history, self.eval_history, self.run_dir / "reward_curve.png")
        summary: dict[str, Any] = {"epochs": self.epoch, "run_dir": str(self.run_dir)}
        if self.eval_history:
            before, after = self.eval_history[0], self.eval_history[-1]
            summary.update(
                eval_before=before["eval_reward_mean"],
                eval_before_epoch=before["epoch"],
                eval_after=after["eval_reward_mean"],
                eval_after_epoch=after["epoch"],
            )
        if self.history:
            summary.update(
                train_reward_first=self.history[0]["reward_mean"], train_reward_last=self.history[-1]["reward_mean"]
            )
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.logger is not None:
            self.logger.close()
        return summary

    def _evaluate_in_loop(self, epoch: int) -> dict[str, Any]:
        """:meth:`_evaluate_and_log`, with any failure reported as a :class:`RewardError` naming the reward, the
        epoch and the checkpoint that holds the training so far (written just before)."""
        try:
            return self._evaluate_and_log(epoch)
        except Exception as exc:
            if epoch == 0:
                kept = "no epoch was trained yet, so nothing is lost; fix the reward and start the run again"
            else:
                kept = (
                    f"training up to epoch {epoch} is saved in {self._checkpoint_note()}; fix the reward and "
                    "continue with --resume (the evaluation is redone first)"
                )
            detail = str(exc) if isinstance(exc, RewardError) else f"{type(exc).__name__}: {exc}"
            raise RewardError(
                f"evaluation after epoch {epoch} failed (reward {self.mdp.reward_name!r}): {detail}. {kept}."
            ) from exc

    def _evaluate_and_log(self, epoch: int) -> dict[str, Any]:
        result = self.evaluate()
        entry = {
            "epoch": epoch,
            "eval_reward_mean": result["eval_reward_mean"],
            "eval_reward_std": result["eval_reward_std"],
        }
        self.eval_history.append(entry)
        if not self.dist.is_main:  # FSDP: the other processes took part in the forward passes only
            return entry
        images_dir = self.run_dir / "images"
        captions = [f"{p} | r={r:.3g}" for p, r in zip(result["prompts"], result["rewards"], strict=True)]
        title = f"held-out eval (η=0), epoch {epoch}: mean reward {result['eval_reward_mean']:.4g}"
        path = save_grid(result["images"], captions, images_dir / f"eval_epoch{epoch:04d}.png", title=title)
        if epoch == 0:
            (images_dir / "before.png").write_bytes(path.read_bytes())
        else:
            (images_dir / "after.png").write_bytes(path.read_bytes())
        if self.logger is not None:
            self.logger.record("eval/reward_mean", entry["eval_reward_mean"])
            self.logger.record("eval/reward_std", entry["eval_reward_std"])
            if epoch == 0:
                self.logger.dump(step=0)
        print(f"[eval] epoch {epoch}: held-out reward {entry['eval_reward_mean']:.4f} ± {entry['eval_reward_std']:.4f}")
        return entry

    def _log(self, metrics: dict[str, Any], timing: dict[str, float]) -> None:
        assert self.logger is not None
        for key, value in metrics.items():
            if key != "epoch":
                self.logger.record(f"train/{key}", value)
        for key, value in timing.items():
            self.logger.record(key, value)
        self.logger.dump(step=metrics["epoch"])
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps({**metrics, **timing}) + "\n")

    @staticmethod
    def _metrics_line(metrics: dict[str, Any], timing: dict[str, float]) -> str:
        parts = [f"epoch {metrics['epoch']}"]
        for key, value in metrics.items():
            if key != "epoch":
                parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        parts += [f"{k.split('/')[-1]}={v:.1f}" for k, v in timing.items()]
        return " ".join(parts)


def evaluation_env(
    components: Any,
    prompts: PromptSet,
    num_envs: int,
    num_steps: int,
    reward: Any = None,
    device: torch.device | str = "cpu",
) -> Any:
    """An η = 0 (deterministic DDIM) vector env for evaluation: torch observations, no autoreset.

    Args:
        components: The loaded model (shared, not copied).
        prompts: The prompt set whose ids :func:`run_deterministic` takes.
        num_envs: Episodes per batch.
        num_steps: T.
        reward: The reward (a loaded callable is shared); None defers it (the env returns images only).
        device: Where latents live.
    """
    return gym.make_vec(
        "DenoisingMDP-v0",
        num_envs=num_envs,
        components=components,
        prompts=prompts,
        num_steps=num_steps,
        eta=0.0,
        reward=reward if reward is not None else "jpeg_compressibility",
        defer_reward=reward is None,
        device=str(device),
        torch_obs=True,
        autoreset_mode="Disabled",
    )


@torch.no_grad()
def run_deterministic(
    env: Any,
    policy: DiffusionPolicy,
    noise: Tensor,
    prompt_ids: Any,
    autocast: Any = contextlib.nullcontext,
) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """One batch of η = 0 episodes through ``env`` (an :func:`evaluation_env`) from fixed noise and prompts.

    Each action is the Gaussian's mean ``schedule.mean(ε̃, t, x_t)`` (σ_t = 0 at η = 0): deterministic DDIM.
    The env decodes x_0 and scores it with its reward (one validation, ``DenoisingMDP.score``).

    Args:
        env: The η = 0 vector env (``num_envs`` = B).
        policy: Its UNet and prompt encoder are used (its own schedule is not).
        noise: ``(B, C, h, w)`` x_T.
        prompt_ids: ``(B,)`` indices into the env's prompt set.
        autocast: Mixed-precision context for the UNet.

    Returns:
        ``(images uint8 (B, H, W, 3), rewards (B,) (zeros if the env defers its reward), x_0 (B, C, h, w))``.
    """
    schedule = env.unwrapped.schedule
    obs, info = env.reset(options={"noise": noise, "prompt_ids": prompt_ids})
    embeds = policy.encode_prompts(list(info["prompt"]))
    terminated = np.zeros(env.num_envs, dtype=bool)
    while not terminated.all():
        latents, timesteps = obs["latent"].to(policy.device), obs["timestep"].to(policy.device)
        # Flow models take the exact t = 1000 σ of the env's schedule (observations carry it rounded).
        with autocast():
            output = policy.predict(latents, schedule.model_time(timesteps), embeds)
        obs, rewards, terminated, _, info = env.step(schedule.mean(output.float(), timesteps, latents))
    return info["image"], np.asarray(rewards, dtype=np.float64), obs["latent"]


@torch.no_grad()
def sample_deterministic(
    policy: DiffusionPolicy,
    noise: Tensor,
    prompts: list[str],
    num_steps: int,
    autocast: Any = contextlib.nullcontext,
) -> Tensor:
    """Deterministic DDIM (η = 0) from ``noise`` ``(B, C, h, w)``; returns x_0 ``(B, C, h, w)``.

    A shorthand for :func:`run_deterministic` on an unscored :func:`evaluation_env` of ``prompts``.
    """
    unique = list(dict.fromkeys(prompts))
    env = evaluation_env(policy.components, PromptSet(unique), len(prompts), num_steps, device=noise.device)
    ids = [unique.index(p) for p in prompts]
    return run_deterministic(env, policy, noise, ids, autocast)[2]
