"""The policy's Gaussian for flow-matching models (SD3, FLUX): one Euler–Maruyama step of a marginal-preserving SDE.

A rectified-flow model is trained on x_σ = (1 - σ) x_0 + σ ε (σ ∈ [0, 1], σ = 1 pure noise) to predict the
velocity v_θ(x_σ, σ, c) ≈ ε - x_0, and is sampled with the deterministic ODE dx = v_θ dσ from σ = 1 to 0. A
deterministic step has no density, so it is no policy. Flow-GRPO (Liu et al. 2025, section 4.2) turns the ODE
into an SDE that has the *same marginals* p_σ at every σ, so that each Euler–Maruyama step is a Gaussian

    π_θ(x_{σ'} | x_σ, c) = N( μ_θ(x_σ, σ, c), (g_σ² Δ) I ),     Δ = σ - σ' > 0,

with a closed-form log-probability: the action of the denoising MDP, as a DDIM step with η > 0 is for DDPO
(``ddim.py``). This module computes that step for a batch whose samples may sit at different steps.

The construction. With x̂_0 = x - σ v and ε̂ = x + (1 - σ) v (the model's predicted data and noise), the score
of p_σ is ∇ log p_σ(x) = -ε̂ / σ. For any diffusion coefficient g_σ, the reverse-time SDE

    dx = [ v_θ - (g_σ² / 2) ∇ log p_σ(x) ] dσ + g_σ dw̄        (σ decreasing)

has the marginals of the ODE (the Fokker–Planck terms of the score drift and of the noise cancel). One
Euler–Maruyama step of size Δ gives the mean and standard deviation above:

    μ_θ = x - Δ [ v_θ + g_σ² / (2σ) (x + (1 - σ) v_θ) ],        std = g_σ √Δ,

and Flow-GRPO's choice g_σ = a √(σ / (1 - σ)), where the noise level a ≥ 0 plays DDIM η's part: a = 0 gives
the ODE's Euler step (what ``FlowMatchEulerDiscreteScheduler.step`` computes; the tests check equality), a > 0
a stochastic policy (Flow-GRPO: a = 0.7).

Names in code -> symbols:

- ``sigma``, ``sigma_next``   -> σ and σ' = the schedule's next sigma (0 after the last step)
- ``delta``                   -> Δ = σ - σ', the (positive) step size
- ``model_output``            -> v_θ(x_σ, σ, c), the predicted velocity ε - x_0
- ``pred_original_sample``    -> x̂_0 = x - σ v_θ
- ``pred_noise``              -> ε̂ = x + (1 - σ) v_θ
- ``noise_level``             -> a
- ``diffusion``               -> g_σ = a √(σ / (1 - σ))
- ``mean``                    -> μ_θ
- ``std``                     -> g_σ √Δ
- ``prev_sample``             -> x_{σ'} = μ_θ + std · z, z ~ N(0, I)

**The schedule and its shift.** The visited sigmas are those of diffusers' ``FlowMatchEulerDiscreteScheduler``
after ``set_timesteps``: a linear ramp s_k moved towards the noisy end by the shift, σ_k = shift · s_k /
(1 + (shift - 1) s_k) (SD3: shift = 3), or, with ``use_dynamic_shifting`` (FLUX), by the resolution-dependent
σ_k = e^μ / (e^μ + (1/s_k - 1)), μ interpolated from the image's token count (``calculate_shift`` in the
FLUX pipeline). :meth:`FlowMatchSchedule.from_scheduler` takes the scheduler's sigmas as float64 (they are
float32 there; holding the same values keeps the a = 0 step bit-identical to ``scheduler.step``).

**Timesteps in observations.** The model's input time is t = 1000 σ, a float. The MDP's observations carry it
rounded to an integer (``timesteps``), which identifies the step exactly as long as no two visited steps
round alike (checked when the schedule is built); the model is fed the exact t of that step.

**The first step, σ = 1.** g_σ is infinite at σ = 1 (1 - σ = 0). As Flow-GRPO does, the step at σ = 1 uses
σ_1, the schedule's second sigma, in the denominator: g = a √(1 / (1 - σ_1)).

**An SDE window** (Flow-GRPO's efficiency variant; MixGRPO slides it): the SDE on a window of consecutive
steps, the ODE (a = 0) elsewhere. Steps outside the window are deterministic; their log-probability is
returned as 0 (a marker, not a density: it has no gradient) and they must not be trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_mdp.ddim import LogProbReduction, stochastic_log_prob


@dataclass
class FlowMatchSchedule:
    """The fixed constants of a flow-matching denoising MDP: the visited sigmas and the SDE's noise level.

    Attributes:
        sigmas: ``(num_steps + 1,)`` float64, σ_0 > σ_1 > ... > σ_T = 0 (the scheduler's, the final 0 included).
        model_timesteps: ``(num_steps,)`` float64, t_k = num_train_timesteps · σ_k, the model's time input.
        timesteps: ``(num_steps,)`` int64, t_k rounded: what observations carry (distinct, so they name the step).
        num_train_timesteps: The scheduler's ``num_train_timesteps`` (1000 for SD3 and FLUX).
        noise_level: a ≥ 0 of g_σ = a √(σ / (1 - σ)); 0 makes every step the ODE's Euler step.
        sde_window: ``(start, stop)``: the SDE only on steps ``start <= k < stop`` (ODE elsewhere); None: all.
        shift: The scheduler's static shift (informative; the sigmas already include it).
        mu: The dynamic shift μ used (FLUX), or None.
    """

    sigmas: Tensor
    model_timesteps: Tensor
    timesteps: Tensor
    num_train_timesteps: int
    noise_level: float = 0.7
    sde_window: tuple[int, int] | None = None
    shift: float = 1.0
    mu: float | None = None

    def __post_init__(self) -> None:
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")
        if len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError(f"{len(self.sigmas)} sigmas for {len(self.timesteps)} steps: expected one more (σ_T = 0)")
        if len(torch.unique(self.timesteps)) != len(self.timesteps):
            raise ValueError(
                f"with {self.num_steps} steps two timesteps round to the same integer, so an observation's "
                "timestep could not tell them apart: use fewer steps"
            )
        if self.sde_window is not None:
            start, stop = self.sde_window
            if not 0 <= start < stop <= self.num_steps:
                raise ValueError(f"sde_window {self.sde_window} must satisfy 0 <= start < stop <= {self.num_steps}")

    @classmethod
    def from_scheduler(
        cls,
        scheduler: object,
        num_steps: int,
        noise_level: float = 0.7,
        mu: float | None = None,
        sigmas: list[float] | None = None,
    ) -> FlowMatchSchedule:
        """Build the schedule of a diffusers ``FlowMatchEulerDiscreteScheduler`` for ``num_steps`` steps.

        Args:
            scheduler: The pipeline's scheduler (its config decides shift, dynamic shifting, the sigma spacing).
            num_steps: Number of denoising steps T of the MDP (the episode length).
            noise_level: a of the SDE.
            mu: The dynamic shift μ (required when the config has ``use_dynamic_shifting``, as for FLUX).
            sigmas: Unshifted sigmas to pass to ``set_timesteps`` (the FLUX pipeline passes
                ``linspace(1, 1/T, T)``); None: the scheduler's default spacing (SD3).
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # type: ignore[attr-defined]
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        config = scheduler.config
        if config.get("stochastic_sampling") or config.get("invert_sigmas"):
            raise ValueError("a FlowMatchEulerDiscreteScheduler with stochastic_sampling or invert_sigmas: unsupported")
        if config.get("use_dynamic_shifting") and mu is None:
            raise ValueError("the scheduler uses dynamic shifting (FLUX): pass mu (the pipeline's calculate_shift)")
        scheduler.set_timesteps(num_steps if sigmas is None else None, sigmas=sigmas, mu=mu)
        model_timesteps = scheduler.timesteps.to(torch.float64).clone()
        return cls(
            sigmas=scheduler.sigmas.to(torch.float64).clone(),
            model_timesteps=model_timesteps,
            timesteps=model_timesteps.round().to(torch.int64),
            num_train_timesteps=int(config.num_train_timesteps),
            noise_level=float(noise_level),
            shift=float(config.get("shift", 1.0)),
            mu=None if mu is None else float(mu),
        )

    @property
    def num_steps(self) -> int:
        """Number of denoising steps (episode length)."""
        return len(self.timesteps)

    @property
    def eta(self) -> float:
        """The stochasticity knob under DDIM's name (the MDP's ``eta`` argument sets ``noise_level``)."""
        return self.noise_level

    def with_sde_window(self, start: int, size: int) -> FlowMatchSchedule:
        """A copy with the SDE on steps ``start .. start + size - 1`` only, the ODE elsewhere."""
        return dataclasses.replace(self, sde_window=(int(start), int(start) + int(size)))

    @property
    def noise_levels(self) -> Tensor:
        """``(num_steps,)`` float64, a at each step (0 outside the SDE window)."""
        levels = torch.full((self.num_steps,), self.noise_level, dtype=torch.float64)
        if self.sde_window is not None:
            start, stop = self.sde_window
            levels[:start] = 0.0
            levels[stop:] = 0.0
        return levels

    def model_time(self, timestep: Tensor) -> Tensor:
        """The network's exact time input t_k = 1000 σ_k ``(B,)`` float64 for observation timesteps ``(B,)``."""
        return self.model_timesteps.to(timestep.device)[self.step_index(timestep)]

    def mean(self, model_output: Tensor, timestep: Tensor, sample: Tensor) -> Tensor:
        """The step's Gaussian mean ``(B, C, H, W)`` for a velocity ``model_output`` at (x_t, t) (the ODE step
        where the noise level is 0), as ``DDIMSchedule.mean`` is for DDIM."""
        timestep = timestep.reshape(-1).expand(sample.shape[0]) if timestep.numel() == 1 else timestep
        return flow_step_with_logprob(self, model_output, timestep, sample, noise=torch.zeros_like(sample)).mean

    def step_index(self, timestep: Tensor) -> Tensor:
        """The step k ``(B,)`` int64 of each timestep ``(B,)`` (rounded or exact t values of this schedule).

        Raises:
            ValueError: A timestep that is not within 0.5 of one of the schedule's.
        """
        reference = self.model_timesteps.to(timestep.device)
        distance = (timestep.to(torch.float64)[:, None] - reference[None, :]).abs()
        nearest, index = distance.min(dim=1)
        if bool((nearest > 0.5).any()):
            bad = timestep[nearest > 0.5].tolist()
            raise ValueError(f"timesteps {bad} are not steps of this schedule ({self.timesteps.tolist()})")
        return index


@dataclass
class FlowStepOutput:
    """Result of :func:`flow_step_with_logprob`. All tensors have the batch first.

    Attributes:
        prev_sample: ``(B, ...)`` the action x_{σ'} (sampled, or the one that was scored).
        log_prob: ``(B,)`` log π(x_{σ'} | x_σ, c), reduced over latent dimensions (see ``reduction``); 0 for
            samples at deterministic steps (a = 0: outside the SDE window, or noise level 0).
        mean: ``(B, ...)`` μ_θ.
        std: ``(B, 1, ..., 1)`` g_σ √Δ (0 at deterministic steps).
        pred_original_sample: ``(B, ...)`` x̂_0 = x - σ v_θ.
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor
    pred_original_sample: Tensor


def _expand(values: Tensor, like: Tensor) -> Tensor:
    """(B,) float64 -> (B, 1, ..., 1) in ``like``'s dtype, broadcastable against ``like``."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def flow_step_with_logprob(
    schedule: FlowMatchSchedule,
    model_output: Tensor,
    timestep: Tensor,
    sample: Tensor,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    reduction: LogProbReduction = "mean",
) -> FlowStepOutput:
    """One Euler–Maruyama step of the marginal-preserving SDE for a batch with per-sample timesteps.

    Args:
        schedule: The MDP's flow-matching constants.
        model_output: ``(B, ...)`` the (guided) velocity v_θ at (x_σ, σ, c).
        timestep: ``(B,)`` each sample's timestep t (the observation's integer, or the exact model t).
        sample: ``(B, ...)`` x_σ.
        prev_sample: ``(B, ...)`` an action x_{σ'} to score. If None, one is sampled.
        generator: RNG for sampling (ignored when ``prev_sample`` or ``noise`` is given).
        noise: ``(B, ...)`` standard normal noise z to use for sampling instead of ``generator``.
        reduction: ``"mean"`` or ``"sum"`` of the per-dimension log-density (see ``ddim.gaussian_log_prob``).

    Returns:
        A :class:`FlowStepOutput`.

    >>> from diffusers import FlowMatchEulerDiscreteScheduler
    >>> schedule = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), num_steps=10)
    >>> x = torch.randn(2, 16, 8, 8)
    >>> out = flow_step_with_logprob(schedule, torch.randn(2, 16, 8, 8), schedule.timesteps[[0, 9]], x)
    >>> out.prev_sample.shape, out.log_prob.shape
    (torch.Size([2, 16, 8, 8]), torch.Size([2]))
    """
    if timestep.ndim != 1 or timestep.shape[0] != sample.shape[0]:
        raise ValueError(f"timestep must have shape (B,) = ({sample.shape[0]},), got {tuple(timestep.shape)}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} differ")

    # 1. σ, σ' and a for each sample's step k, in float64 from the schedule.
    index = schedule.step_index(timestep.to(sample.device)).cpu()
    sigma, sigma_next = schedule.sigmas[index], schedule.sigmas[index + 1]
    noise_level = schedule.noise_levels[index]
    delta = sigma - sigma_next  # Δ > 0

    # 2. The diffusion coefficient g_σ = a √(σ / (1 - σ)); at σ = 1 the denominator uses σ_1 (module docstring).
    second_sigma = schedule.sigmas[1] if schedule.num_steps > 1 else torch.tensor(0.0, dtype=torch.float64)
    one_minus = 1 - torch.where(sigma >= 1, second_sigma, sigma)
    diffusion = noise_level * (sigma / one_minus).sqrt()
    # The drift's coefficient g_σ² / (2σ), and the std g_σ √Δ; both 0 where a = 0.
    score_coef = diffusion**2 / (2 * sigma)
    std_dev = diffusion * delta.sqrt()

    sigma_b, score_coef_b, std = _expand(sigma, sample), _expand(score_coef, sample), _expand(std_dev, sample)

    # 3. Predicted data and noise from the velocity: x̂_0 = x - σ v, ε̂ = x + (1 - σ) v.
    pred_original_sample = sample - sigma_b * model_output
    pred_noise = sample + (1 - sigma_b) * model_output

    # 4. Mean μ_θ = x - Δ [v + g_σ²/(2σ) ε̂]. The ODE part is written as diffusers writes its Euler step,
    #    x + (σ' - σ) v, so that a = 0 reproduces scheduler.step bit for bit.
    dt = _expand(sigma_next - sigma, sample)  # -Δ, rounded once to the latent dtype as diffusers' sigmas are
    mean = sample + dt * model_output
    if bool((noise_level > 0).any()):
        mean = mean + dt * score_coef_b * pred_noise

    # 5. Sample x_{σ'} = μ + std · z unless an action was given to score.
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = mean + std * noise
    elif prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample {tuple(prev_sample.shape)} must have the shape of x_σ {tuple(sample.shape)}")

    # 6. log π(x_{σ'} | x_σ, c) = log N(x_{σ'}; μ_θ, std²), the per-dimension densities reduced by their MEAN over
    #    latent dimensions by default (DDPO's and Flow-GRPO's convention; "sum" gives the true log-density).
    #    Gradients flow through the mean only (std is a constant of the schedule). Deterministic samples get 0.
    log_prob = stochastic_log_prob(prev_sample, mean, std, reduction)
    return FlowStepOutput(prev_sample, log_prob, mean, std, pred_original_sample)
