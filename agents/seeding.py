"""Seeding of a run: independent random streams per (seed, purpose, epoch, batch), and the global RNG states.

Every random draw of an epoch comes from a generator seeded by ``derived_seed(seed, SEED_TAGS[purpose], epoch,
batch)`` (env resets, policy noise, shuffling, group prompts, RWR's training noise, evaluation), so epoch e
does the same thing whether the run was resumed or not. The global torch/NumPy/Python RNGs are seeded once
from the ``"init"`` stream (:func:`seed_global_rngs`) and, with the env's generators, checkpointed
(:func:`rng_states`, :func:`restore_rng_states`).

Example:
    >>> derived_seed(0, SEED_TAGS["noise"], 3) == derived_seed(0, SEED_TAGS["noise"], 3)
    True
    >>> derived_seed(0, SEED_TAGS["noise"], 3) == derived_seed(0, SEED_TAGS["shuffle"], 3)
    False
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from diffusion_mdp.envs.vector import DenoisingVectorEnv

# The purposes of the random streams (the second key of derived_seed); a new purpose takes a new number.
SEED_TAGS = {"env": 0, "noise": 1, "shuffle": 2, "group": 3, "train": 4, "eval": 5, "init": 6, "window": 7}


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (independent streams per (seed, epoch, batch, purpose))."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_global_rngs(seed: int) -> None:
    """Seed torch's, NumPy's and Python's global RNGs from the run's ``"init"`` stream.

    Done before anything draws from them (the LoRA initialisation does): two runs with the same seed start
    from the same weights whatever ran before in the process.
    """
    torch.manual_seed(derived_seed(seed, SEED_TAGS["init"]))
    np.random.seed(derived_seed(seed, SEED_TAGS["init"]) % 2**32)
    random.seed(derived_seed(seed, SEED_TAGS["init"]))


def rng_states(env: DenoisingVectorEnv) -> dict[str, Any]:
    """The global RNG states (torch, CUDA, NumPy, Python) and the env's generators, as a checkpoint stores them."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "env": env.get_rng_state(),
    }


def restore_rng_states(rng: dict[str, Any], env: DenoisingVectorEnv) -> None:
    """Restore what :func:`rng_states` returned (the CUDA states only where CUDA is available)."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    env.set_rng_state(rng["env"])
