"""Shared machinery of every agent: setup, rollouts, evaluation, checkpoints, logging, the epoch loop.

An algorithm is a subclass of :class:`DiffusionAgent` that implements one method,
:meth:`DiffusionAgent.train_on_rollouts`, which reads the filled :class:`DenoisingRolloutBuffer` and updates
the UNet (see ``ddpo_is.py``, ``ddpo_sf.py``, ``rwr.py``; each reads top to bottom). Everything else — the
vector env in fast torch mode, the policy, LoRA, AdamW, SB3 schedules and logger, autocast, advantages,
atomic checkpoints with RNG states, held-out evaluation, image grids and the reward plot — lives here once.

Reproducibility: every random draw of an epoch comes from generators seeded by ``(seed, epoch, batch)``
(env resets, policy noise, shuffling), so epoch e does the same thing whether the run was resumed or not;
the global torch/NumPy/Python RNG states and the env's generators are checkpointed as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.utils import FloatSchedule, LinearSchedule
from torch import Tensor

import diffusion_mdp  # noqa: F401  (registers DenoisingMDP-v0)
from diffusion_mdp.distributed import Distributed, sync_rollout_buffer
from diffusion_mdp.mdp import RewardError
from diffusion_mdp.policy import DiffusionPolicy
from diffusion_mdp.prompts import PromptSet, load_prompts
from diffusion_mdp.rewards.executor import AsyncReward

from .advantages import AdvantageNormalizer
from .buffer import DenoisingRolloutBuffer, StepBatch
from .config import ConfigError, TrainConfig
from .visual import plot_rewards, save_grid

CHECKPOINT_FORMAT = 1
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as the paper's LoRA
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


def add_lora(unet: torch.nn.Module, rank: int, alpha: float) -> None:
    """Freeze the UNet and add a trainable LoRA adapter to its attention projections (diffusers + peft)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(  # type: ignore[operator]
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES)
    )
    # Trainable parameters stay in float32 even when the forward runs under bf16/fp16 autocast.
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def export_lora(unet: torch.nn.Module, folder: str | os.PathLike[str]) -> Path:
    """Save the UNet's LoRA adapter in diffusers format (``StableDiffusionPipeline.load_lora_weights``)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    folder = Path(folder)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` atomically: a crash leaves either the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class DiffusionAgent:
    """Base class: everything but the update rule. Subclasses set ``algorithm`` and ``train_on_rollouts``.

    Args:
        config: A validated :class:`TrainConfig`.
        components: Already loaded model components to use (tests share one load); None loads ``config.model``.
    """

    algorithm: ClassVar[str] = ""

    def __init__(self, config: TrainConfig, components: Any = None) -> None:
        self.config = cfg = config.validate()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        # Multi-process (accelerate launch / torchrun): inert with one process; see diffusion_mdp.distributed.
        self.dist = Distributed.from_environment(cfg.device)
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
        self.dist.broadcast_parameters(self.trainable)  # identical adapters everywhere (they are seeded alike too)
        self.autocast_dtype = resolve_autocast_dtype(cfg.mixed_precision, self.device)
        self.optimizer = self._optimizer_class()(
            self.trainable,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
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
        self.normalizer = AdvantageNormalizer(cfg.advantage_mode, cfg.stat_buffer_size, cfg.stat_min_count)
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
        self.last_images: tuple[np.ndarray, list[str], np.ndarray] | None = None

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
    # Hooks for algorithms
    # ------------------------------------------------------------------------------------------
    def train_on_rollouts(self, epoch: int) -> dict[str, float]:
        """Update the UNet from the filled buffer; return metrics. Implemented by each algorithm."""
        raise NotImplementedError

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
        self.scaler.scale(loss).backward()

    def optimizer_step(self) -> float:
        """All-reduce (multi-process), unscale, clip the gradient norm, step AdamW, zero; returns the pre-clip norm."""
        self.dist.all_reduce_grads(self.trainable)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
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
            return f"{self.checkpoint_path}, epoch {torch.load(self.checkpoint_path, weights_only=False)['epoch']}"
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
            "trainable": {n: p.detach().clone() for n, p in self.unet.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(),
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
            raise ValueError(f"unsupported checkpoint format {state.get('format')!r}")
        params = dict(self.unet.named_parameters())
        missing = [n for n in state["trainable"] if n not in params]
        if missing:
            raise ValueError(f"checkpoint has weights this model lacks: {missing[:3]} (LoRA vs full fine-tuning?)")
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

    def save_checkpoint(self) -> Path:
        atomic_torch_save(self.state_dict(), self.checkpoint_path)
        return self.checkpoint_path

    def load_checkpoint(self, path: str | os.PathLike[str] | None = None) -> None:
        self.load_state_dict(torch.load(path or self.checkpoint_path, weights_only=False, map_location=self.device))

    # ------------------------------------------------------------------------------------------
    # The epoch loop
    # ------------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Finish the current epoch, write a checkpoint, then stop (what Ctrl-C does)."""
        self._stop_requested = True

    @contextlib.contextmanager
    def _interrupt_handler(self) -> Iterator[None]:
        """First Ctrl-C: stop after this epoch with a checkpoint. Second: abort now (last checkpoint kept)."""
        if not hasattr(signal, "SIGINT") or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            print("\nCtrl-C: finishing this epoch, then saving a checkpoint (Ctrl-C again aborts without saving)")
            self.request_stop()

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

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
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            self.logger = self._setup_logger()
        if self.epoch > 0 and main:  # resumed: metrics.jsonl may hold epochs after the checkpoint (a crash): rewrite
            lines = [json.dumps(metrics) + "\n" for metrics in self.history]
            (self.run_dir / "metrics.jsonl").write_text("".join(lines))
        if self.epoch == 0 and not self.eval_history and cfg.eval_num_samples and main:
            self._evaluate_and_log(0)
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
                if self.dist.enabled:  # stop together (Ctrl-C reaches the processes at different moments)
                    flag = torch.tensor([float(self._stop_requested)], device=self.device)
                    self._stop_requested = bool(self.dist.all_reduce_sum_(flag).item() > 0)
                if not main:
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
                if cfg.eval_num_samples and (self.epoch % cfg.eval_every == 0 or done):
                    self._evaluate_and_log(self.epoch)
                if self.epoch % cfg.save_every == 0 or done or self._stop_requested:
                    self.save_checkpoint()
                if self._stop_requested:
                    bar.close()
                    raise KeyboardInterrupt(f"stopped after epoch {self.epoch}; checkpoint {self.checkpoint_path}")
        bar.close()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Final outputs: the LoRA (or full UNet) in diffusers format, the reward plot, summary.json."""
        if not self.dist.is_main:
            return {"epochs": self.epoch, "run_dir": str(self.run_dir), "rank": self.dist.rank}
        if self.config.use_lora:
            export_lora(self.unet, self.run_dir / "lora")
        else:  # full fine-tuning: the whole UNet, loadable with UNet2DConditionModel.from_pretrained(run / "unet")
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

    def _evaluate_and_log(self, epoch: int) -> dict[str, Any]:
        result = self.evaluate()
        entry = {
            "epoch": epoch,
            "eval_reward_mean": result["eval_reward_mean"],
            "eval_reward_std": result["eval_reward_std"],
        }
        self.eval_history.append(entry)
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
        with autocast():
            output = policy.predict(latents, timesteps, embeds)
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
