"""``train``: build the agent of a config (fresh or resumed) and run it — what ``diffusion-mdp train`` calls.

A run folder belongs to one run: a fresh run goes only into an empty (or new) folder, or one whose earlier
run stopped before training anything; anything else needs ``resume=True`` (there is a checkpoint) or
``overwrite=True`` (delete the old run's files, never files that are not a run's). Paths in the config
(model folder, prompt files) are stored absolute, so a run resumes from any working directory.

The extension point for a new algorithm is :func:`register_algorithm`: subclass
:class:`~diffusion_mdp.agents.base.DiffusionAgent`, implement ``train_on_rollouts``, register the class.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .base import DiffusionAgent
from .checkpointing import checkpoint_candidates, checkpoint_path, find_checkpoint, prompt_fingerprint  # noqa: F401
from .config import ALGORITHMS, ConfigError, TrainConfig
from .ddpo_is import DDPOIS
from .ddpo_sf import DDPOSF
from .flow_grpo import FlowGRPO
from .rwr import RWR, SparseRWR

AGENTS: dict[str, type[DiffusionAgent]] = {"ddpo_is": DDPOIS, "ddpo_sf": DDPOSF, "rwr": RWR, "sparse_rwr": SparseRWR}

# Fields that may change when a run is resumed: they do not change what the run computes.
RESUMABLE_OVERRIDES = frozenset(
    {
        "num_epochs",
        "save_every",
        "eval_every",
        "image_every",
        "log_formats",
        "progress_bar",
        "num_threads",
        "device",
        "keep_checkpoints",
        "reward_timeout",
        "reward_retries",
        "reward_token",
    }
)
# What a run writes into its folder; --overwrite deletes these and nothing else.
RUN_ARTEFACTS = frozenset(
    {
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "reward_curve.png",
        "logs",
        "images",
        "checkpoints",
        "lora",
        "unet",
        "failed_rewards",
    }
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


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with a local model folder and prompt files made absolute (names stay names), so that the
    checkpoint's config means the same files from any working directory."""
    from diffusion_mdp.models import BUNDLED_MODELS
    from diffusion_mdp.prompts import available_prompt_sets

    changes: dict[str, str] = {}
    registered = set(available_prompt_sets())
    for key in ("model", "prompts", "eval_prompts"):
        value = getattr(config, key)
        if not value or value in BUNDLED_MODELS or (key != "model" and value in registered):
            continue
        path = Path(value).expanduser()
        if path.exists() and not path.is_absolute():
            changes[key] = str(path.resolve())
    return config.replace(**changes) if changes else config


def _no_checkpoint_message(run_dir: Path) -> str:
    folder = run_dir / "checkpoints"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return (
            f"--resume: no checkpoint in {folder}: {run_dir} holds a run that stopped before its first checkpoint, "
            "so there is nothing to resume. Start it over with --overwrite (deletes that run's files), or start "
            "a new run under another --name"
        )
    return f"--resume: no checkpoint in {folder} (no run there); start the run without --resume"


def resume_config(run_dir: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of the run in ``run_dir``, with the allowed ``overrides`` (e.g. more epochs).

    The run folder is where the checkpoint was found (``output_dir`` and ``name`` come from ``run_dir``, not
    from the checkpoint, whose relative paths meant another working directory).

    Raises:
        ConfigError: No checkpoint there (or none intact), or an override that would change what the run computes.
    """
    run_dir = Path(run_dir)
    found = find_checkpoint(run_dir, warn=False)  # train() says which file it resumes from
    if found is None:
        raise ConfigError(_no_checkpoint_message(run_dir))
    saved = found[1]["config"]
    overrides = dict(overrides or {})
    overrides.pop("name", None)
    overrides.pop("output_dir", None)
    if overrides:  # compare paths as the checkpoint stores them (absolute)
        normalised = absolute_paths(TrainConfig.from_dict({**saved, **overrides}))
        for key in ("model", "prompts", "eval_prompts"):
            if key in overrides:
                overrides[key] = getattr(normalised, key)
    changed = {k: v for k, v in overrides.items() if k not in RESUMABLE_OVERRIDES and saved.get(k) != v}
    if changed:
        raise ConfigError(
            f"--resume continues the same run, but these settings differ from the checkpoint's: "
            f"{', '.join(f'{k} ({saved.get(k)!r} -> {v!r})' for k, v in changed.items())}. Drop them, or start "
            f"a new run under another --name. Changeable on resume: {', '.join(sorted(RESUMABLE_OVERRIDES))}"
        )
    return TrainConfig.from_dict({**saved, **overrides, "output_dir": str(run_dir.parent), "name": run_dir.name})


def check_prompts_unchanged(state: dict[str, Any], path: Path) -> None:
    """Refuse to resume on prompt files that changed since the checkpoint: the run would go on with other prompts.

    Raises:
        ConfigError: A prompt file that no longer loads, or whose prompts differ from the checkpoint's.
    """
    from diffusion_mdp.prompts import load_prompts

    saved = state["config"]
    for key, digest in (state.get("prompt_fingerprints") or {}).items():
        spec = saved.get(key)
        if not spec:  # the model's default set / the training prompts: not a user file
            continue
        try:
            current = prompt_fingerprint(load_prompts(spec))
        except (ValueError, FileNotFoundError, TypeError) as exc:
            raise ConfigError(f"--resume: {key}={spec!r} of the checkpoint {path} no longer loads: {exc}") from exc
        if current != digest:
            raise ConfigError(
                f"--resume: the {key} file {spec} changed since the checkpoint {path} (epoch {state['epoch']}) was "
                "written, so the run would continue on other prompts than it started with. Restore the file, or "
                "start a new run (another --name) with the new prompts"
            )


def prepare_run_dir(run_dir: Path, overwrite: bool = False) -> None:
    """Make sure a fresh run may write into ``run_dir`` (and, with ``overwrite``, delete the old run's files).

    A folder whose earlier run trained at least one epoch (a checkpoint, metrics, exports, kept samples) is
    refused unless ``overwrite``; files that are not a run's are never deleted, and refused where the run would
    overwrite one of its own names beside them (a ``config.json`` there may be someone else's).

    Raises:
        ConfigError: The folder holds a previous run and ``overwrite`` is not set, or files the run would
            overwrite that are not a run's.
    """
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run folder: choose another --name or --output-dir")
    entries = sorted(p.name for p in run_dir.iterdir())
    foreign = [name for name in entries if name not in RUN_ARTEFACTS]
    ours = [name for name in entries if name in RUN_ARTEFACTS]
    checkpoints = checkpoint_candidates(run_dir)
    metrics = run_dir / "metrics.jsonl"
    epochs = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    kept = [name for name in ("failed_rewards", "lora", "unet", "summary.json") if name in entries]
    if not checkpoints and not epochs and not kept:  # no earlier run that trained anything: nothing to lose
        if foreign and ours:
            raise ConfigError(
                f"{run_dir} is not a run folder (it holds {', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}) but has {', '.join(ours)}, which a run would overwrite. "
                "Choose another --name or --output-dir (--overwrite never deletes files a run did not write)"
            )
        return
    if not overwrite:
        if checkpoints:
            raise ConfigError(
                f"{run_dir} already holds a run (checkpoint {checkpoints[0]}): pass --resume to continue it, "
                "--overwrite to delete it and start over, or choose another --name / --output-dir"
            )
        what = [f"{epochs} epoch(s) in metrics.jsonl"] if epochs else []
        what += [f"{name}" for name in kept]
        raise ConfigError(
            f"{run_dir} holds a run that stopped before its first checkpoint ({', '.join(what)}): a fresh run "
            "there would mix two runs' logs and overwrite its images. Pass --overwrite to delete it and start "
            "over, or choose another --name / --output-dir"
        )
    for name in ours:  # only what a run writes: other files in the folder stay
        target = run_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    print(f"--overwrite: deleted the previous run's files in {run_dir}: {', '.join(ours)}")


def train(
    config: TrainConfig, resume: bool = False, components: Any = None, overwrite: bool = False
) -> tuple[DiffusionAgent, dict[str, Any]]:
    """Train (or continue) the run of ``config``; returns the agent and its summary.

    Args:
        config: The run's config (for ``resume``, usually from :func:`resume_config`).
        resume: Continue from the run's newest intact checkpoint (``<run_dir>/checkpoints/``).
        components: Optional already-loaded model components (tests).
        overwrite: A fresh run may replace the previous run in its folder (its files are deleted first).

    Raises:
        ConfigError: A bad config, resuming without a checkpoint or on changed prompt files, or a fresh run into a
            folder that holds another run (or files that are not a run's).
    """
    config.validate()
    run_dir = config.run_dir
    if Path(os.path.normpath(run_dir)).parent != Path(os.path.normpath(config.output_dir)):
        raise ConfigError(f"name={config.name!r} would put the run outside output_dir={config.output_dir!r}")
    if resume and overwrite:
        raise ConfigError("--resume continues the run and --overwrite deletes it: pass one of them")
    if resume:
        found = find_checkpoint(run_dir)
        if found is None:
            raise ConfigError(_no_checkpoint_message(run_dir))
        path, state = found
        check_prompts_unchanged(state, path)
        agent = make_agent(config, components)
        agent.load_checkpoint(path)
        print(f"resumed from {path} (epoch {agent.epoch})")
    else:
        config = absolute_paths(config)
        prepare_run_dir(run_dir, overwrite)
        agent = make_agent(config, components)
    summary = agent.learn()
    return agent, summary

