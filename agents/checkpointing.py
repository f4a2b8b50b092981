"""Checkpoints: atomic writes, the safe (``weights_only``) format, keep-last-K, fallback to an intact file.

A run's checkpoints live in ``<run>/checkpoints/``: ``last.pt`` (:func:`checkpoint_path`) is the newest, the
previous ones sit beside it as ``epoch<N>.pt`` (the newest ``keep_checkpoints`` in all), so a damaged newest
file still leaves one to resume from (:func:`find_checkpoint`). A checkpoint holds everything needed to
resume exactly: the trainable weights, optimizer, scaler, advantage statistics, histories and every RNG
state (:mod:`~diffusion_mdp.agents.seeding`). :class:`CheckpointMixin` gives the agent its ``state_dict``,
``save_checkpoint`` and ``load_checkpoint``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from diffusion_mdp.prompts import PromptSet

from .advantages import AdvantageNormalizer
from .config import ConfigError, TrainConfig
from .seeding import restore_rng_states, rng_states

if TYPE_CHECKING:
    from diffusion_mdp.envs.vector import DenoisingVectorEnv

    from .distributed import Distributed

# Format 2: loadable with torch.load(weights_only=True) (tensors and plain data, NumPy arrays as tagged bytes),
# so opening someone else's run folder cannot execute code. Format 1 pickled NumPy objects.
CHECKPOINT_FORMAT = 2
CHECKPOINT_NAME = "last.pt"
_EPOCH_FILE = re.compile(r"epoch(\d+)\.pt")


def checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    """Where a run's newest checkpoint is written (older ones sit beside it as ``epoch<N>.pt``)."""
    return Path(run_dir) / "checkpoints" / CHECKPOINT_NAME


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


class CheckpointMixin:
    """``state_dict`` / ``load_state_dict`` and the run's checkpoint files, for :class:`DiffusionAgent`."""

    # What the agent provides (set in DiffusionAgent.__init__).
    algorithm: ClassVar[str]
    config: TrainConfig
    run_dir: Path
    checkpoint_path: Path
    device: torch.device
    dist: Distributed
    env: DenoisingVectorEnv
    unet: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    normalizer: AdvantageNormalizer
    train_prompts: PromptSet
    eval_prompts: PromptSet
    epoch: int
    global_step: int
    history: list[dict[str, Any]]
    eval_history: list[dict[str, Any]]
    _saved_epoch: int | None
    _eval_pending: bool

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
            "rng": rng_states(self.env.unwrapped),
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
        restore_rng_states(state["rng"], self.env.unwrapped)

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


    def _checkpoint_note(self) -> str:
        if self.checkpoint_path.is_file():
            epoch = self._saved_epoch
            if epoch is None:
                with contextlib.suppress(CheckpointError):
                    epoch = load_checkpoint_file(self.checkpoint_path)["epoch"]
            return f"{self.checkpoint_path}, epoch {epoch if epoch is not None else '?'}"
        return "none written yet"
