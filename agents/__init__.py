"""RL algorithms for the denoising MDP (installed as ``diffusion_mdp.agents``).

- :class:`DDPOIS` (``ddpo_is``): PPO-clip importance sampling, :class:`DDPOSF` (``ddpo_sf``): REINFORCE,
  :class:`RWR` / :class:`SparseRWR`: the reward-weighted regression baselines, :class:`FlowGRPO`
  (``flow_grpo``): group advantages + PPO-clip + KL, with an SDE window.
- :class:`DiffusionAgent`: the shared machinery (rollouts, checkpoints, evaluation, logging).
- :class:`DenoisingRolloutBuffer`, :class:`PerPromptStatTracker`, :class:`AdvantageNormalizer`.
- :class:`TrainConfig`, :data:`PRESETS`, :func:`build_config`, :func:`train`, :func:`resume_config`.
"""

from .advantages import AdvantageNormalizer, PerPromptStatTracker, batch_statistics, group_statistics
from .base import DiffusionAgent, export_lora, sample_deterministic
from .buffer import DenoisingRolloutBuffer, StepBatch, TrajectoryMinibatch
from .config import PRESETS, ConfigError, TrainConfig, build_config
from .ddpo_is import DDPOIS, ppo_clip_loss
from .ddpo_sf import DDPOSF
from .flow_grpo import FlowGRPO, flow_grpo_loss
from .rwr import RWR, SparseRWR, rwr_weights, sparse_rwr_weights
from .train import AGENTS, make_agent, register_algorithm, resume_config, train

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
