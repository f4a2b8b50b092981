"""``train``: build the agent of a config (fresh or resumed) and run it — what ``diffusion-mdp train`` calls.

The extension point for a new algorithm is :func:`register_algorithm`: subclass
:class:`~diffusion_mdp.agents.base.DiffusionAgent`, implement ``train_on_rollouts``, register the class.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .base import DiffusionAgent
from .config import ALGORITHMS, ConfigError, TrainConfig
from .ddpo_is import DDPOIS
from .ddpo_sf import DDPOSF
from .flow_grpo import FlowGRPO
from .rwr import RWR, SparseRWR

AGENTS: dict[str, type[DiffusionAgent]] = {"ddpo_is": DDPOIS, "ddpo_sf": DDPOSF, "rwr": RWR, "sparse_rwr": SparseRWR}

# Fields that may change when a run is resumed: they do not change what the run computes.
RESUMABLE_OVERRIDES = frozenset(
    {"num_epochs", "save_every", "eval_every", "image_every", "log_formats", "progress_bar", "num_threads", "device"}
)


def register_algorithm(name: str, cls: type[DiffusionAgent]) -> None:
    """Make ``algorithm=name`` build ``cls`` (a :class:`DiffusionAgent` subclass)."""
    AGENTS[name] = cls
    if name not in ALGORITHMS:
        import diffusion_mdp.agents.config as config_module

        config_module.ALGORITHMS = (*config_module.ALGORITHMS, name)


register_algorithm("flow_grpo", FlowGRPO)


def make_agent(config: TrainConfig, components: Any = None) -> DiffusionAgent:
    """The agent of ``config.algorithm``."""
    return AGENTS[config.algorithm](config, components=components)


def checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "checkpoints" / "last.pt"


def resume_config(run_dir: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of the run in ``run_dir``, with the allowed ``overrides`` (e.g. more epochs).

    Raises:
        ConfigError: No checkpoint there, or an override that would change what the run computes.
    """
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}; start the run without --resume")
    saved = torch.load(path, weights_only=False, map_location="cpu")["config"]
    overrides = dict(overrides or {})
    changed = {k: v for k, v in overrides.items() if k not in RESUMABLE_OVERRIDES and saved.get(k) != v}
    changed.pop("name", None)
    changed.pop("output_dir", None)
    if changed:
        raise ConfigError(
            f"--resume continues the same run, but these settings differ from the checkpoint's: "
            f"{', '.join(f'{k} ({saved.get(k)!r} -> {v!r})' for k, v in changed.items())}. Drop them, or start "
            f"a new run under another --name. Changeable on resume: {', '.join(sorted(RESUMABLE_OVERRIDES))}"
        )
    return TrainConfig.from_dict({**saved, **overrides, "output_dir": saved["output_dir"], "name": saved["name"]})


def train(config: TrainConfig, resume: bool = False, components: Any = None) -> tuple[DiffusionAgent, dict[str, Any]]:
    """Train (or continue) the run of ``config``; returns the agent and its summary.

    Args:
        config: The run's config (for ``resume``, usually from :func:`resume_config`).
        resume: Continue from ``<run_dir>/checkpoints/last.pt``.
        components: Optional already-loaded model components (tests).

    Raises:
        ConfigError: A bad config, resuming without a checkpoint, or a fresh run over an existing checkpoint.
    """
    config.validate()
    path = checkpoint_path(config.run_dir)
    if resume and not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}; start the run without --resume")
    if not resume and path.is_file():
        raise ConfigError(
            f"{config.run_dir} already holds a run (checkpoint {path}): pass --resume to continue it, or "
            "choose another --name / --output-dir"
        )
    agent = make_agent(config, components)
    if resume:
        agent.load_checkpoint(path)
    summary = agent.learn()
    return agent, summary
