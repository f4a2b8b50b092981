"""Advantage estimation for DDPO: reward normalisation per prompt, per batch, or per group.

With γ = λ = 1 and no value function, every step of a trajectory has the same advantage, the
trajectory's normalised terminal reward (DDPO, section 4.3):

    A(s_t, a_t) = (r(x_0, c) - μ_c) / σ_c        for every t,

where (μ_c, σ_c) are the statistics chosen by the mode:

- ``per_prompt``: the paper's per-prompt stat tracking: the last ``buffer_size`` rewards seen for prompt c,
  across epochs; until a prompt has ``min_count`` of them, the current batch's statistics are used.
- ``batch``: the current batch's mean and standard deviation.
- ``group``: the statistics of the k samples of the same prompt in the current batch (GRPO).

Advantages are then clipped to ± ``adv_clip_max``.

**A floor on σ for saturated rewards.** Dividing by σ_c makes every prompt's advantages unit-size, however
small the spread of its rewards. When the base model already scores near the maximum (prompt alignment on
tiny-shapes: ~0.95, a spread of a few hundredths that is mostly the judge's noise), that turns noise into
full-size advantages, and fixed-size Adam steps on it random-walk the model, lowering the reward it
optimises. ``std_floor`` divides by ``max(σ_c, std_floor)`` instead: a prompt whose rewards differ by less
than the floor gets advantages proportional to those differences in the reward's own units (small), and a
prompt with real spread is normalised as in the paper. 0 (the default) is the paper's normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# The generic statistics live in the core (the SB3 adapter uses them too); re-exported here.
from diffusion_mdp.normalization import (  # noqa: F401
    STD_EPS,
    PerPromptStatTracker,
    batch_statistics,
    group_statistics,
)


class AdvantageNormalizer:
    """The advantage mode of a run, as one object with a saveable state.

    Args:
        mode: ``"per_prompt"``, ``"batch"`` or ``"group"``.
        buffer_size, min_count: Of the per-prompt tracker.
        std_floor: σ is ``max(σ, std_floor)`` (in reward units; 0: no floor). See the module docstring.

    >>> normalizer = AdvantageNormalizer("group")
    >>> mean, std = normalizer(np.array([1.0, 3.0, 5.0, 5.0]), ["a", "a", "b", "b"], np.array([0, 0, 1, 1]))
    >>> mean.tolist()  # the advantage is then (return - μ) / σ, here per group of k = 2 samples
    [2.0, 2.0, 5.0, 5.0]

    >>> returns = np.array([0.96, 0.97, 0.95, 0.96])  # a saturated reward: the spread is the judge's noise
    >>> AdvantageNormalizer("batch")(returns, ["a"] * 4, np.zeros(4))[1].round(4).tolist()
    [0.0071, 0.0071, 0.0071, 0.0071]
    >>> AdvantageNormalizer("batch", std_floor=0.1)(returns, ["a"] * 4, np.zeros(4))[1].tolist()
    [0.1, 0.1, 0.1, 0.1]
    """

    def __init__(
        self, mode: str = "per_prompt", buffer_size: int = 16, min_count: int = 16, std_floor: float = 0.0
    ) -> None:
        if mode not in ("per_prompt", "batch", "group"):
            raise ValueError(f"advantage mode must be per_prompt, batch or group, got {mode!r}")
        if not std_floor >= 0:
            raise ValueError(f"std_floor={std_floor} must be >= 0 (0 disables the floor)")
        self.mode = mode
        self.std_floor = float(std_floor)
        self.tracker = PerPromptStatTracker(buffer_size, min_count)

    def __call__(
        self, returns: np.ndarray, prompts: Sequence[str], group_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each trajectory's (μ, σ), ``(B,)`` each, from its return ``(B,)``, prompt and group id."""
        if self.mode == "per_prompt":
            mean, std = self.tracker.statistics(prompts, returns)
        elif self.mode == "batch":
            mean, std = batch_statistics(returns)
        else:
            mean, std = group_statistics(np.asarray(group_ids), returns)
        return mean, np.maximum(std, self.std_floor)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mode = state["mode"]
        self.tracker.load_state_dict(state["tracker"])
