"""A flow-matching model's time in Stable-Baselines3 observations: the model time t = 1000 σ and σ, as floats.

The environments' observations carry every model's timestep as an integer (``Discrete``): DDIM's t is one, and
a flow model's t_k = 1000 σ_k is rounded to one so that it names the step (``diffusion_mdp/flow.py``). To an
RL library that reads observations as data that is the wrong space for a flow model: its time is continuous
(σ ∈ [0, 1], t ∈ [0, 1000], the shift makes the steps uneven) and SB3 one-hot encodes a ``Discrete`` space
into 1001 classes of which a run visits T. The SB3 adapter (:class:`~diffusion_mdp.envs.sb3.DenoisingSB3VecEnv`)
therefore observes, for flow-matching models,

- ``timestep``: ``Box(0, num_train_timesteps, (1,), float32)``, the exact model time t_k the network is
  called with (0 in the final observation), and
- ``sigma``: ``Box(0, 1, (1,), float32)``, the noise level σ_k (0 in the final observation),

and DDIM models keep their ``Discrete`` integer t. :class:`FlowTimeObservation` does the same for a single
environment (what SB3's ``check_env`` takes). :func:`policy_timesteps` maps observed times back to the step's
integer timestep that :class:`~diffusion_mdp.policy.DiffusionPolicy` reads (nearest step, so float32 rounding
of t cannot pick a wrong one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from diffusion_mdp.flow import FlowMatchSchedule

from .denoising import observation_space_for


def is_flow_schedule(schedule: Any) -> bool:
    """Whether ``schedule`` is a flow-matching one (its time is σ, not DDIM's integer t)."""
    return isinstance(schedule, FlowMatchSchedule)


def observation_space(mdp: Any) -> spaces.Dict:
    """The SB3 adapter's observation space: the env's, with float ``timestep`` and ``sigma`` for flow models."""
    space = observation_space_for(mdp)
    if not is_flow_schedule(mdp.schedule):
        return space
    entries = dict(space.spaces)
    top = float(mdp.schedule.num_train_timesteps)
    # Shape (1,), not (): SB3's buffers and checker handle one-element vectors, not 0-d arrays.
    entries["timestep"] = spaces.Box(0.0, top, shape=(1,), dtype=np.float32)
    entries["sigma"] = spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
    return spaces.Dict(entries)


def flow_time(schedule: FlowMatchSchedule, timesteps: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(t, σ)`` float32 arrays shaped like ``timesteps``, the env's rounded integer timesteps.

    The final observation's timestep 0 (no step of the schedule) maps to t = σ = 0.
    """
    ints = np.asarray(timesteps, dtype=np.int64)
    flat = ints.reshape(-1)
    t = np.zeros(flat.shape, dtype=np.float64)
    sigma = np.zeros(flat.shape, dtype=np.float64)
    terminal = (flat == 0) & (0 not in schedule.timesteps.tolist())
    if (~terminal).any():
        index = schedule.step_index(torch.as_tensor(flat[~terminal])).cpu().numpy()
        t[~terminal] = schedule.model_timesteps.cpu().numpy()[index]
        sigma[~terminal] = schedule.sigmas.cpu().numpy()[index]
    return t.astype(np.float32).reshape(ints.shape), sigma.astype(np.float32).reshape(ints.shape)


def convert_observation(schedule: Any, obs: Mapping[str, Any]) -> dict[str, Any]:
    """``obs`` with a flow model's ``timestep`` as its float model time and ``sigma`` added (DDIM: unchanged).

    The integer timesteps ``(N,)`` (or a single env's scalar) become float32 ``(N, 1)`` (``(1,)``).
    """
    out = dict(obs)
    if is_flow_schedule(schedule):
        t, sigma = flow_time(schedule, obs["timestep"])
        out["timestep"], out["sigma"] = t[..., None], sigma[..., None]
    return out


def policy_timesteps(schedule: Any, timesteps: Tensor | np.ndarray) -> Tensor:
    """``(B,)`` int64: the integer timesteps :class:`DiffusionPolicy` reads, from observed (B,) or (B, 1) times.

    DDIM: the integers themselves (SB3's buffer hands them back as floats). Flow: the step nearest to each
    observed model time, as the schedule's integer timestep.
    """
    values = torch.as_tensor(timesteps).reshape(-1)
    if not is_flow_schedule(schedule):
        return values.round().long()
    index = schedule.step_index(values.cpu())
    return schedule.timesteps.cpu()[index].to(values.device)


class FlowTimeObservation(gym.ObservationWrapper):
    """A single :class:`~diffusion_mdp.envs.DenoisingEnv` observed as the SB3 adapter observes (see the module)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.mdp: Any = getattr(env.unwrapped, "mdp")  # noqa: B009  (a DenoisingEnv's; gym.Env does not declare it)
        self.observation_space = observation_space(self.mdp)

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        return convert_observation(self.mdp.schedule, observation)


__all__ = [
    "FlowTimeObservation",
    "convert_observation",
    "flow_time",
    "is_flow_schedule",
    "observation_space",
    "policy_timesteps",
]
