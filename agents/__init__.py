"""RL algorithms for the denoising MDP (installed as ``diffusion_mdp.agents``).

- :class:`DDPOIS` (``ddpo_is``): PPO-clip importance sampling, :class:`DDPOSF` (``ddpo_sf``): REINFORCE,
  :class:`RWR` / :class:`SparseRWR`: the reward-weighted regression baselines, :class:`FlowGRPO`
  (``flow_grpo``): group advantages + PPO-clip + KL, with an SDE window.
- :class:`DiffusionAgent`: the shared machinery (rollouts, checkpoints, evaluation, logging).
- :class:`DenoisingRolloutBuffer`, :class:`PerPromptStatTracker`, :class:`AdvantageNormalizer`.
- :class:`TrainConfig`, :data:`PRESETS`, :func:`build_config`, :func:`train`, :func:`resume_config`.
"""

import importlib
import sys
import types
from typing import Any

# Lazy: building an env or the SB3 adapter must not load every agent module (PEP 562 __getattr__).
_HOMES = {
    "AdvantageNormalizer": "advantages",
    "PerPromptStatTracker": "advantages",
    "batch_statistics": "advantages",
    "group_statistics": "advantages",
    "DiffusionAgent": "base",
    "export_lora": "base",
    "sample_deterministic": "base",
    "DenoisingRolloutBuffer": "buffer",
    "StepBatch": "buffer",
    "TrajectoryMinibatch": "buffer",
    "PRESETS": "presets",
    "ConfigError": "config",
    "TrainConfig": "config",
    "build_config": "config",
    "DDPOIS": "ddpo_is",
    "ppo_clip_loss": "ddpo_is",
    "DDPOSF": "ddpo_sf",
    "FlowGRPO": "flow_grpo",
    "flow_grpo_loss": "flow_grpo",
    "RWR": "rwr",
    "SparseRWR": "rwr",
    "rwr_weights": "rwr",
    "sparse_rwr_weights": "rwr",
    "AGENTS": "train",
    "make_agent": "train",
    "register_algorithm": "train",
    "resume_config": "train",
    "train": "train",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "AGENTS",
    "DDPOIS",
    "DDPOSF",
    "PRESETS",
    "RWR",
    "AdvantageNormalizer",
    "ConfigError",
    "DenoisingRolloutBuffer",
    "DiffusionAgent",
    "FlowGRPO",
    "PerPromptStatTracker",
    "SparseRWR",
    "StepBatch",
    "TrainConfig",
    "TrajectoryMinibatch",
    "batch_statistics",
    "build_config",
    "export_lora",
    "flow_grpo_loss",
    "group_statistics",
    "make_agent",
    "ppo_clip_loss",
    "register_algorithm",
    "resume_config",
    "rwr_weights",
    "sample_deterministic",
    "sparse_rwr_weights",
    "train",
]


class _Package(types.ModuleType):
    """The package's module type: its ``train`` is the function, although a submodule has that name too.

    Importing ``diffusion_mdp.agents.train`` sets the package's attribute ``train`` to the submodule; a data
    descriptor on the module's type takes precedence over that, so ``from diffusion_mdp.agents import train``
    always gives the function, lazily.
    """

    @property
    def train(self) -> Any:
        return importlib.import_module(".train", __name__).train

    @train.setter
    def train(self, value: Any) -> None:  # the import system's assignment of the submodule: ignored
        pass


sys.modules[__name__].__class__ = _Package
