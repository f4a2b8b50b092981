"""The epoch loop: ``learn`` runs epochs (sample, update, log, save, evaluate) until ``num_epochs``.

Per epoch: the learning rate from its schedule, :meth:`collect_rollouts`, :meth:`train_on_rollouts` (the one
update loop, ``update.py``), the metrics to SB3's logger and ``metrics.jsonl``, a training image grid, a
checkpoint (before the evaluation: a failing reward loses no trained epoch), then the held-out evaluation.
The first Ctrl-C / SIGTERM / SIGHUP stops after the epoch with a checkpoint (:class:`TrainingStopped`); the
second aborts. ``finish`` writes the LoRA (or the full UNet), the reward plot and ``summary.json``.
:class:`EpochLoopMixin` gives the agent these.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.utils import FloatSchedule

from diffusion_mdp.lora import export_lora
from diffusion_mdp.models import DiffusionComponents

from .config import TrainConfig
from .distributed import Distributed
from .visual import plot_rewards, save_grid


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on a signal (Ctrl-C, SIGTERM, SIGHUP); ``signum`` says which."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


class EpochLoopMixin:
    """``learn``, ``finish`` and ``request_stop`` for :class:`DiffusionAgent`."""

    # What the agent provides (set in DiffusionAgent.__init__).
    algorithm: ClassVar[str]
    config: TrainConfig
    run_dir: Path
    checkpoint_path: Path
    device: torch.device
    dist: Distributed
    unet: Any
    components: DiffusionComponents
    optimizer: torch.optim.Optimizer
    lr_schedule: FloatSchedule
    scheduled_lr: float
    logger: Logger | None
    epoch: int
    global_step: int
    history: list[dict[str, Any]]
    eval_history: list[dict[str, Any]]
    last_images: tuple[np.ndarray, list[str], np.ndarray] | None
    _stop_requested: bool
    _stop_signal: int
    _eval_pending: bool

    if TYPE_CHECKING:

        def progress_remaining(self, epoch: int) -> float: ...

        def collect_rollouts(self, epoch: int) -> dict[str, Any]: ...

        def train_on_rollouts(self, epoch: int) -> dict[str, float]: ...

        def save_checkpoint(self, eval_pending: bool = False) -> Path: ...

        def _evaluate_in_loop(self, epoch: int) -> dict[str, Any]: ...

        def _checkpoint_note(self) -> str: ...

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
                lr = self.scheduled_lr = self.lr_schedule(self.progress_remaining(epoch))
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                metrics: dict[str, Any] = {"epoch": epoch + 1, **self.collect_rollouts(epoch)}
                t1 = time.perf_counter()
                metrics.update(self.dist.average_metrics(self.train_on_rollouts(epoch)))
                t2 = time.perf_counter()
                metrics["lr"] = self.optimizer.param_groups[0]["lr"]  # the last update's: lr_warmup_steps scales it
                metrics["global_step"] = self.global_step
                self.epoch = epoch + 1
                self.history.append(metrics)
                timing = {"time/sampling_s": t1 - t0, "time/training_s": t2 - t1}
                done = self.epoch == cfg.num_epochs
                # Stop together (Ctrl-C reaches the processes at different moments).
                self._stop_requested = self.dist.any_process(self._stop_requested)
                eval_due = bool(cfg.eval_num_samples) and (self.epoch % cfg.eval_every == 0 or done)
                save_due = self.epoch % cfg.save_every == 0 or done or eval_due  # and whenever a stop is requested
                if not main:
                    if self.dist.sharded:  # FSDP: gathering the checkpoint and evaluating are collective
                        if save_due or self._stop_requested:
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
                # Save before evaluating: an evaluation that fails (its reward) loses no trained epoch. The stop flag
                # is read here, not above: a signal may arrive while the images are written.
                if save_due or self._stop_requested:
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
