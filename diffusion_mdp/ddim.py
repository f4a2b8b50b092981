"""The policy's Gaussian: one stochastic DDIM step, with the log-probability of its action.

In the denoising MDP (DDPO, section 4.1) the action at state s_t = (c, t, x_t) is the next latent
a_t = x_{t-1}, drawn from

    π_θ(x_{t-1} | x_t, c) = N( μ_θ(x_t, t, c), σ_t² I )

where μ_θ and σ_t are those of a DDIM step with η > 0 (Song et al. 2021, eq. 12 and 16). This module
computes that step for a batch whose samples may sit at *different* timesteps, following diffusers'
``DDIMScheduler.step`` line for line (its mean equals ``step(..., variance_noise=0)``; the tests check this
for all three prediction types).

Names in code -> symbols in the DDIM paper:

- ``alpha_prod_t``            -> α_t (cumulative product, ᾱ_t in DDPM notation)
- ``alpha_prod_t_prev``       -> α_{t-1}, the cumulative product at the *previous* timestep of the schedule
- ``beta_prod_t``             -> 1 - α_t
- ``pred_original_sample``    -> f_θ(x_t, t), the predicted x_0
- ``pred_epsilon``            -> ε_θ(x_t, t)
- ``std_dev_t``               -> σ_t(η) = η √((1 - α_{t-1}) / (1 - α_t)) √(1 - α_t / α_{t-1})
- ``pred_sample_direction``   -> √(1 - α_{t-1} - σ_t²) ε_θ, "direction pointing to x_t"
- ``mean``                    -> √α_{t-1} f_θ + direction, the Gaussian mean μ_θ
- ``prev_sample``             -> x_{t-1} = μ_θ + σ_t z, z ~ N(0, I)
- ``t_prev``                  -> t - Δ, the timestep the step moves to (clamped to 0 at the last step)

**For your own algorithm.** :class:`DDIMSchedule` answers every schedule question per timestep, the last
one included, so a from-scratch loop needs no indexing of its own (``alphas_cumprod[t - Δ]`` reads index -Δ
at the last step): :meth:`DDIMSchedule.alpha_prod_t`, :meth:`~DDIMSchedule.alpha_prod_t_prev`,
:meth:`~DDIMSchedule.std_dev_t`, :meth:`~DDIMSchedule.t_prev` and :meth:`~DDIMSchedule.mean` (μ_θ of a UNet
output). With those, π_θ(· | s_t) is ``torch.distributions.Normal(schedule.mean(output, t, x_t),
schedule.std_dev_t(t))``:

>>> from diffusers import DDIMScheduler
>>> scheduler = DDIMScheduler(set_alpha_to_one=False, steps_offset=1)  # Stable Diffusion's settings
>>> schedule = DDIMSchedule.from_scheduler(scheduler, num_steps=10)
>>> t = schedule.timesteps[-1:]                      # the last step: t - Δ < 0
>>> int(t), int(schedule.t_prev(t)), float(schedule.alpha_prod_t_prev(t)) == float(schedule.alphas_cumprod[0])
(1, 0, True)
>>> x_t, output = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
>>> policy = torch.distributions.Normal(schedule.mean(output, t, x_t), schedule.std_dev_t(t, like=x_t))
>>> policy.sample().shape
torch.Size([1, 4, 8, 8])

**The final step's α_{t-1}.** At the last step there is no previous timestep (t - Δ < 0). diffusers uses
``scheduler.final_alpha_cumprod``: 1.0 when ``set_alpha_to_one=True``, else α_0. The authors' DDPO code clamps
the previous timestep to 0, i.e. always uses α_0. We follow diffusers (so that our mean *is* the scheduler's
step); for Stable Diffusion's configs (``set_alpha_to_one=False``) and for the bundled tiny-shapes model
the two agree. With ``set_alpha_to_one=True`` the last step would have σ = 0 — a deterministic action with no
log-probability — so :class:`DDIMSchedule` refuses that combination with η > 0 and says how to fix it.

**A stochastic window** (``sde_window``, as for flow-matching models in ``flow.py``): η on the steps
``start <= k < stop`` only, η = 0 (deterministic DDIM) elsewhere. The trajectory then branches only inside
the window, so a terminal reward is credited to the window's actions alone (MixGRPO's and Flow-GRPO-Fast's
idea, here for DDIM). Steps outside the window have no density: their log-probability is returned as 0 (a
marker, not a density; it has no gradient) and they must not be trained on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "sample"]
LogProbReduction = Literal["mean", "sum"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class DDIMSchedule:
    """The fixed constants of the denoising MDP: which timesteps are visited, and the noise schedule.

    Attributes:
        alphas_cumprod: ``(num_train_timesteps,)`` float64, α_t for every training timestep.
        final_alpha_cumprod: α used as α_{t-1} at the final step (see the module docstring).
        timesteps: ``(num_steps,)`` int64, the visited timesteps in decreasing order (t_T, ..., t_1).
        num_train_timesteps: Length of the training schedule (1000 for Stable Diffusion).
        eta: η of DDIM; η > 0 makes the policy stochastic (η = 1 is DDPM-like, the paper's setting).
        prediction_type: What the UNet predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        clip_sample_range: If set, the predicted x_0 is clamped to ± this (diffusers' ``clip_sample``).
        sde_window: ``(start, stop)``: η only on steps ``start <= k < stop`` (η = 0 elsewhere); None: every step.

    >>> from diffusers import DDIMScheduler
    >>> schedule = DDIMSchedule.from_scheduler(DDIMScheduler(set_alpha_to_one=False), num_steps=4)
    >>> schedule.timesteps.tolist(), schedule.step_size  # T = 4 steps of 1000 / 4 training timesteps
    ([750, 500, 250, 0], 250)
    """

    alphas_cumprod: Tensor
    final_alpha_cumprod: float
    timesteps: Tensor
    num_train_timesteps: int
    eta: float = 1.0
    prediction_type: PredictionType = "epsilon"
    clip_sample_range: float | None = None
    sde_window: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {self.prediction_type!r}"
            )
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.eta > 0 and self.final_alpha_cumprod >= 1.0:
            raise ValueError(
                "the scheduler has set_alpha_to_one=True, which makes the last DDIM step deterministic "
                "(σ = 0), so its action has no log-probability. Load the scheduler with "
                "DDIMScheduler.from_config(config, set_alpha_to_one=False) (Stable Diffusion's own setting)."
            )
        if self.sde_window is not None:
            start, stop = self.sde_window
            if not 0 <= start < stop <= self.num_steps:
                raise ValueError(f"sde_window {self.sde_window} must satisfy 0 <= start < stop <= {self.num_steps}")

    @classmethod
    def from_scheduler(cls, scheduler: Any, num_steps: int, eta: float = 1.0) -> DDIMSchedule:
        """Build the schedule of a diffusers DDIM scheduler for ``num_steps`` denoising steps.

        Args:
            scheduler: A ``diffusers.DDIMScheduler`` (its config decides spacing, prediction type, clipping).
            num_steps: Number of denoising steps T of the MDP (the episode length).
            eta: DDIM η.
        """
        from diffusers import DDIMScheduler

        if not isinstance(scheduler, DDIMScheduler):
            scheduler = DDIMScheduler.from_config(scheduler.config)  # type: ignore[attr-defined]
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if num_steps > scheduler.config.num_train_timesteps:
            raise ValueError(
                f"num_steps={num_steps} exceeds the model's {scheduler.config.num_train_timesteps} training timesteps"
            )
        if scheduler.config.thresholding:
            raise ValueError("dynamic thresholding is not supported by the stochastic DDIM policy")
        scheduler.set_timesteps(num_steps)
        return cls(
            alphas_cumprod=scheduler.alphas_cumprod.to(torch.float64).clone(),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            timesteps=scheduler.timesteps.to(torch.int64).clone(),
            num_train_timesteps=int(scheduler.config.num_train_timesteps),
            eta=float(eta),
            prediction_type=scheduler.config.prediction_type,
            clip_sample_range=float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None,
        )

    @property
    def num_steps(self) -> int:
        """Number of denoising steps (episode length)."""
        return len(self.timesteps)

    @property
    def step_size(self) -> int:
        """Δ = num_train_timesteps // num_steps, the gap between consecutive timesteps (as in diffusers)."""
        return self.num_train_timesteps // self.num_steps

    def with_sde_window(self, start: int, size: int) -> DDIMSchedule:
        """A copy with η on steps ``start .. start + size - 1`` only, deterministic DDIM (η = 0) elsewhere.

        >>> from diffusers import DDIMScheduler
        >>> schedule = DDIMSchedule.from_scheduler(DDIMScheduler(set_alpha_to_one=False), num_steps=4)
        >>> schedule.with_sde_window(0, 2).etas(schedule.timesteps).tolist()
        [1.0, 1.0, 0.0, 0.0]
        """
        return dataclasses.replace(self, sde_window=(int(start), int(start) + int(size)))

    def step_index(self, timestep: Tensor) -> Tensor:
        """The step k ``(B,)`` int64 of each timestep ``(B,)`` (k = 0 is the first, noisiest step).

        Raises:
            ValueError: A timestep that is not one of the schedule's.
        """
        reference = self.timesteps.to(timestep.device)
        matches = timestep.reshape(-1, 1) == reference.reshape(1, -1)
        if not bool(matches.any(dim=1).all()):
            bad = timestep.reshape(-1)[~matches.any(dim=1)].tolist()
            raise ValueError(f"timesteps {bad} are not steps of this schedule ({self.timesteps.tolist()})")
        return matches.to(torch.int64).argmax(dim=1)

    def etas(self, timestep: Tensor | int) -> Tensor:
        """η at each timestep ``(B,)`` float64: ``eta`` inside the SDE window (everywhere without one), else 0."""
        timestep = _as_timesteps(timestep)
        etas = torch.full(timestep.shape, self.eta, dtype=torch.float64, device=timestep.device)
        if self.sde_window is None:
            return etas
        k = self.step_index(timestep)
        inside = (k >= self.sde_window[0]) & (k < self.sde_window[1])
        return torch.where(inside, etas, torch.zeros_like(etas))

    def prev_timestep(self, timestep: Tensor) -> Tensor:
        """t - Δ for each entry (negative at the final step; :meth:`t_prev` clamps it)."""
        return timestep - self.step_size

    # ----------------------------------------------------------------------------------------------
    # Per-timestep constants for your own algorithm. Each takes t ``(B,)`` (an int or 0-d tensor is one
    # sample) from ``timesteps`` and returns ``(B,)`` float64 on t's device, or ``(B, 1, ..., 1)`` in
    # ``like``'s dtype and device when ``like`` ``(B, ...)`` is given (ready to broadcast against x_t).
    # ----------------------------------------------------------------------------------------------
    def t_prev(self, timestep: Tensor | int) -> Tensor:
        """t_prev = max(t - Δ, 0), the timestep the step from t moves to (int64, the shape of ``timestep``).

        0 at the last step, the authors' clamp. Its α is :meth:`alpha_prod_t_prev`, which reads
        ``final_alpha_cumprod`` there: equal to ``alphas_cumprod[0]`` whenever η > 0 (the schedule refuses
        ``set_alpha_to_one=True`` then).
        """
        return self.prev_timestep(_as_timesteps(timestep)).clamp(min=0)

    def alpha_prod_t(self, timestep: Tensor | int, like: Tensor | None = None) -> Tensor:
        """α_t (ᾱ_t in DDPM notation), the cumulative product of the noise schedule at t."""
        return _shaped(self.alphas_at(_as_timesteps(timestep))[0], like)

    def alpha_prod_t_prev(self, timestep: Tensor | int, like: Tensor | None = None) -> Tensor:
        """α_{t-1} (ᾱ_prev), the cumulative product at t - Δ; ``final_alpha_cumprod`` at the last step."""
        return _shaped(self.alphas_at(_as_timesteps(timestep))[1], like)

    def std_dev_t(self, timestep: Tensor | int, like: Tensor | None = None) -> Tensor:
        """σ_t(η) = η √((1 - α_{t-1}) / (1 - α_t)) √(1 - α_t / α_{t-1}), the policy's standard deviation
        (0 outside the SDE window)."""
        alpha_prod_t, alpha_prod_t_prev = self.alphas_at(_as_timesteps(timestep))
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        eta = self.eta if self.sde_window is None else self.etas(timestep).to(variance.device)
        return _shaped(eta * variance.sqrt(), like)

    def model_time(self, timestep: Tensor) -> Tensor:
        """The UNet's time input for observation timesteps ``(B,)``: t itself (flow schedules map it to 1000 σ)."""
        return timestep

    def mean(self, model_output: Tensor, timestep: Tensor | int, sample: Tensor) -> Tensor:
        """μ_θ(x_t, t, c) ``(B, C, H, W)``: the Gaussian's mean for a UNet output (DDIM eq. 12 without noise).

        Args:
            model_output: ``(B, C, H, W)`` the (guided) UNet output at (x_t, t, c).
            timestep: ``(B,)`` t per sample, or one int for the whole batch.
            sample: ``(B, C, H, W)`` x_t.
        """
        timestep = _as_timesteps(timestep).to(sample.device)
        if timestep.numel() == 1 and sample.shape[0] != 1:
            timestep = timestep.reshape(1).expand(sample.shape[0])
        return ddim_step_with_logprob(self, model_output, timestep, sample, noise=torch.zeros_like(sample)).mean

    def alphas_at(self, timestep: Tensor) -> tuple[Tensor, Tensor]:
        """(α_t, α_{t-1}) for a batch of timesteps ``(B,)``, as float64 ``(B,)`` on the timesteps' device."""
        alphas = self.alphas_cumprod.to(timestep.device)
        prev = self.prev_timestep(timestep)
        alpha_prod_t = alphas[timestep]
        final = torch.full_like(alpha_prod_t, self.final_alpha_cumprod)
        alpha_prod_t_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
        return alpha_prod_t, alpha_prod_t_prev


@dataclass
class DDIMStepOutput:
    """Result of :func:`ddim_step_with_logprob`. All tensors have the batch first.

    Attributes:
        prev_sample: ``(B, C, H, W)`` the action x_{t-1} (sampled, or the one that was scored).
        log_prob: ``(B,)`` log π(x_{t-1} | x_t, c), reduced over latent dimensions (see ``reduction``);
            None when η = 0 (a deterministic step has no density); 0 for samples at steps outside the
            schedule's SDE window.
        mean: ``(B, C, H, W)`` μ_θ.
        std: ``(B, 1, 1, 1)`` σ_t (broadcastable to the latent).
        pred_original_sample: ``(B, C, H, W)`` the predicted x_0.
    """

    prev_sample: Tensor
    log_prob: Tensor | None
    mean: Tensor
    std: Tensor
    pred_original_sample: Tensor


def _as_timesteps(timestep: Tensor | int) -> Tensor:
    """An int, 0-d or ``(B,)`` timestep as an int64 tensor of at least one dimension."""
    return torch.as_tensor(timestep, dtype=torch.int64).reshape(-1)


def _shaped(values: Tensor, like: Tensor | None) -> Tensor:
    """``(B,)`` float64 as is, or broadcastable against ``like`` in its dtype and device."""
    return values if like is None else _expand(values, like).to(like.device)


def _expand(values: Tensor, like: Tensor) -> Tensor:
    """(B,) float64 -> (B, 1, ..., 1) in ``like``'s dtype, broadcastable against ``like``."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduction: LogProbReduction = "mean") -> Tensor:
    """log N(x; mean, std² I), reduced over all but the batch dimension.

    Args:
        x: ``(B, ...)`` points to score.
        mean: ``(B, ...)``.
        std: broadcastable to ``x``, strictly positive.
        reduction: ``"mean"`` (default) or ``"sum"`` over the non-batch dimensions.

    Returns:
        ``(B,)``.

    >>> x = torch.zeros(1, 2, 3)
    >>> mean_lp = gaussian_log_prob(x, torch.zeros(1, 2, 3), torch.tensor(1.0))
    >>> round(float(mean_lp), 4)  # log N(0; 0, 1) = -log √(2π) per dimension
    -0.9189
    >>> torch.allclose(gaussian_log_prob(x, x, torch.tensor(1.0), reduction="sum"), 6 * mean_lp)  # D = 6
    True
    """
    # log N = -(x - μ)² / (2σ²) - log σ - log √(2π), elementwise, then reduced.
    per_dim = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    dims = tuple(range(1, x.ndim))
    # The DDPO convention is the MEAN over latent dimensions: the per-step log-prob of a 4x64x64 latent is
    # then O(1) instead of O(16k), and a PPO clip range of 1e-4 on exp(Δ log π) is meaningful. The SUM is
    # the true log-density of the action (use it when comparing to other likelihoods); it is
    # num_latent_dims times the mean, so ratios become exp(num_dims * Δ) and need a much wider clip range.
    if reduction == "mean":
        return per_dim.mean(dim=dims)
    if reduction == "sum":
        return per_dim.sum(dim=dims)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def stochastic_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduction: LogProbReduction = "mean") -> Tensor:
    """:func:`gaussian_log_prob` for samples whose std is > 0, the marker 0 for those at deterministic steps.

    Args:
        x: ``(B, ...)`` points to score.
        mean: ``(B, ...)``.
        std: ``(B, 1, ..., 1)``, ≥ 0 (0: a deterministic step, outside an SDE window).
        reduction: ``"mean"`` or ``"sum"`` over the non-batch dimensions.

    Returns:
        ``(B,)``; 0 (no gradient) where std is 0.

    >>> x = torch.zeros(2, 3)
    >>> [round(v, 4) for v in stochastic_log_prob(x, x, torch.tensor([[1.0], [0.0]])).tolist()]  # -log √(2π), 0
    [-0.9189, 0.0]
    """
    stochastic = std > 0
    log_prob = gaussian_log_prob(x, mean, torch.where(stochastic, std, torch.ones_like(std)), reduction)
    return torch.where(stochastic.reshape(-1), log_prob, torch.zeros_like(log_prob))


def ddim_step_with_logprob(
    schedule: DDIMSchedule,
    model_output: Tensor,
    timestep: Tensor,
    sample: Tensor,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    reduction: LogProbReduction = "mean",
) -> DDIMStepOutput:
    """One stochastic DDIM step for a batch with per-sample timesteps, and the log-prob of its result.

    Args:
        schedule: The MDP's DDIM constants.
        model_output: ``(B, C, H, W)`` the (guided) UNet output at (x_t, t, c).
        timestep: ``(B,)`` int64, each sample's current timestep t (values from ``schedule.timesteps``).
        sample: ``(B, C, H, W)`` x_t.
        prev_sample: ``(B, C, H, W)`` an action x_{t-1} to score. If None, one is sampled.
        generator: RNG for sampling (ignored when ``prev_sample`` or ``noise`` is given).
        noise: ``(B, C, H, W)`` standard normal noise z to use for sampling instead of ``generator``.
        reduction: ``"mean"`` or ``"sum"`` of the per-dimension log-density (see :func:`gaussian_log_prob`).

    Returns:
        A :class:`DDIMStepOutput`.

    >>> from diffusers import DDIMScheduler
    >>> schedule = DDIMSchedule.from_scheduler(DDIMScheduler(set_alpha_to_one=False, steps_offset=1), num_steps=10)
    >>> x_t = torch.randn(2, 4, 8, 8)
    >>> out = ddim_step_with_logprob(schedule, torch.randn(2, 4, 8, 8), schedule.timesteps[[0, 9]], x_t)
    >>> out.prev_sample.shape, out.log_prob.shape
    (torch.Size([2, 4, 8, 8]), torch.Size([2]))
    """
    if timestep.ndim != 1 or timestep.shape[0] != sample.shape[0]:
        raise ValueError(f"timestep must have shape (B,) = ({sample.shape[0]},), got {tuple(timestep.shape)}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} differ")
    timestep = timestep.to(device=sample.device, dtype=torch.int64)

    # 1. α_t and α_{t-1} for each sample (α_{t-1} = final_alpha_cumprod at the last step).
    alpha_prod_t, alpha_prod_t_prev = schedule.alphas_at(timestep)
    beta_prod_t = 1 - alpha_prod_t

    # 2. Variance σ_t² (DDIM eq. 16), computed in float64 from the schedule, then cast to the latent dtype.
    #    With an SDE window, η is 0 at the steps outside it (deterministic DDIM there).
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    eta = schedule.eta if schedule.sde_window is None else schedule.etas(timestep)
    std_dev_t = eta * variance.sqrt()

    alpha_prod_t, alpha_prod_t_prev, beta_prod_t = (
        _expand(alpha_prod_t, sample),
        _expand(alpha_prod_t_prev, sample),
        _expand(beta_prod_t, sample),
    )
    std = _expand(std_dev_t, sample)

    # 3. Predicted x_0 and ε from the model output.
    if schedule.prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
        pred_epsilon = model_output
    elif schedule.prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t.sqrt() * pred_original_sample) / beta_prod_t.sqrt()
    else:  # v_prediction
        pred_original_sample = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
        pred_epsilon = alpha_prod_t.sqrt() * model_output + beta_prod_t.sqrt() * sample

    # 4. Optional clipping of x_0 (diffusers' clip_sample; off for Stable Diffusion). As in diffusers with
    #    use_clipped_model_output=False, ε is *not* re-derived from the clipped x_0.
    if schedule.clip_sample_range is not None:
        pred_original_sample = pred_original_sample.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)

    # 5. Mean μ_θ = √α_{t-1} x̂_0 + √(1 - α_{t-1} - σ_t²) ε̂   (DDIM eq. 12 without the noise term).
    pred_sample_direction = (1 - alpha_prod_t_prev - std**2).sqrt() * pred_epsilon
    mean = alpha_prod_t_prev.sqrt() * pred_original_sample + pred_sample_direction

    # 6. Sample x_{t-1} = μ + σ z unless an action was given to score.
    scoring = prev_sample is not None
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = mean + std * noise
    elif prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample {tuple(prev_sample.shape)} must have the shape of x_t {tuple(sample.shape)}")

    # 7. log π(x_{t-1} | x_t, c): gradients flow through the mean only (σ_t is a constant of the schedule).
    #    With η = 0 (deterministic DDIM, used for evaluation) there is no density: log_prob is None.
    if schedule.eta == 0:
        if scoring:
            raise ValueError("η = 0 makes the step deterministic: an action has no log-probability to score")
        return DDIMStepOutput(prev_sample, None, mean, std, pred_original_sample)
    if schedule.sde_window is None:
        log_prob = gaussian_log_prob(prev_sample, mean, std, reduction)
    else:
        #    Outside the SDE window the step is deterministic: its log-prob is the marker 0, not a density.
        log_prob = stochastic_log_prob(prev_sample, mean, std, reduction)
    return DDIMStepOutput(prev_sample, log_prob, mean, std, pred_original_sample)
