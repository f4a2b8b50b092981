"""The flow-matching SDE step against diffusers' FlowMatchEulerDiscreteScheduler, torch Normal and its marginals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusion_mdp.flow import FlowMatchSchedule, flow_step_with_logprob

SD3_CONFIG = {"shift": 3.0}  # stabilityai/stable-diffusion-3(.5)-medium's scheduler_config.json
FLUX_CONFIG = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}


def flux_mu(image_seq_len: int) -> float:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return float(calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15))


def schedules(num_steps: int, noise_level: float) -> list[tuple[FlowMatchEulerDiscreteScheduler, FlowMatchSchedule]]:
    """(scheduler after set_timesteps, our schedule) for SD3's static shift and FLUX's dynamic one."""
    sd3 = FlowMatchEulerDiscreteScheduler(**SD3_CONFIG)
    ours_sd3 = FlowMatchSchedule.from_scheduler(sd3, num_steps, noise_level)
    flux = FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).tolist()  # what FluxPipeline passes
    ours_flux = FlowMatchSchedule.from_scheduler(flux, num_steps, noise_level, mu=flux_mu(4096), sigmas=sigmas)
    return [(sd3, ours_sd3), (flux, ours_flux)]


@pytest.mark.parametrize("family", [0, 1], ids=["sd3-shift", "flux-dynamic-shift"])
def test_noise_level_zero_is_the_scheduler_step(family):
    scheduler, schedule = schedules(12, noise_level=0.0)[family]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 16, 8, 8, generator=generator)
    for k, t in enumerate(scheduler.timesteps):
        model_output = torch.randn(3, 16, 8, 8, generator=generator)
        ours = flow_step_with_logprob(schedule, model_output, schedule.timesteps[k].repeat(3), sample)
        scheduler._step_index = k
        reference = scheduler.step(model_output, t, sample).prev_sample
        assert torch.equal(ours.prev_sample, reference)  # bit-exact
        assert not ours.std.any() and not ours.log_prob.any()  # deterministic: no density, log-prob marker 0
        sample = reference


def test_schedule_applies_the_shift():
    (_, sd3), (_, flux) = schedules(10, 0.7)
    # The default ramp runs from 1 to sigma_min, itself shifted at construction from 1/1000:
    sigma_min = 3 * 0.001 / (1 + 2 * 0.001)
    ramp = np.linspace(1.0, sigma_min, 10)
    np.testing.assert_allclose(sd3.sigmas[:-1].numpy(), 3 * ramp / (1 + 2 * ramp), rtol=1e-6)
    mu, ramp = flux_mu(4096), np.linspace(1.0, 0.1, 10)
    np.testing.assert_allclose(flux.sigmas[:-1].numpy(), math.exp(mu) / (math.exp(mu) + (1 / ramp - 1)), rtol=1e-6)
    assert sd3.sigmas[-1] == 0 and flux.sigmas[-1] == 0
    assert sd3.timesteps.dtype == torch.int64 and sd3.timesteps[0] == 1000
    assert sd3.sigmas.dtype == torch.float64


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(reduction):
    _, schedule = schedules(10, noise_level=0.7)[0]
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(4, 16, 4, 4, generator=generator, dtype=torch.float64)
    model_output = torch.randn(4, 16, 4, 4, generator=generator, dtype=torch.float64)
    timesteps = schedule.timesteps[[0, 3, 7, 9]]  # per-sample timesteps, σ = 1 included
    action = torch.randn(4, 16, 4, 4, generator=generator, dtype=torch.float64)
    out = flow_step_with_logprob(schedule, model_output, timesteps, sample, prev_sample=action, reduction=reduction)
    normal = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
    per_dim = normal.log_prob(action)
    expected = per_dim.mean(dim=(1, 2, 3)) if reduction == "mean" else per_dim.sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-12, atol=1e-12)
    # The Gaussian's parameters, written out: μ = x - Δ [v + a² / (2 (1 - σ)) (x + (1 - σ) v)], std = a √(σΔ/(1-σ)).
    index = schedule.step_index(timesteps)
    sigma, sigma_next = schedule.sigmas[index], schedule.sigmas[index + 1]
    one_minus = torch.where(sigma >= 1, 1 - schedule.sigmas[1], 1 - sigma)
    delta = (sigma - sigma_next).reshape(-1, 1, 1, 1)
    s, om = sigma.reshape(-1, 1, 1, 1), one_minus.reshape(-1, 1, 1, 1)
    mean = sample - delta * (model_output + 0.49 / (2 * om) * (sample + (1 - s) * model_output))
    torch.testing.assert_close(out.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.std, 0.7 * (s * delta / om).sqrt(), rtol=1e-12, atol=1e-12)


def test_sampling_draws_from_the_gaussian_and_scores_itself():
    _, schedule = schedules(10, noise_level=0.7)[0]
    sample, model_output = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    timesteps = schedule.timesteps[[2, 5]]
    noise = torch.randn(2, 16, 4, 4)
    out = flow_step_with_logprob(schedule, model_output, timesteps, sample, noise=noise)
    torch.testing.assert_close(out.prev_sample, out.mean + out.std * noise)
    scored = flow_step_with_logprob(schedule, model_output, timesteps, sample, prev_sample=out.prev_sample)
    torch.testing.assert_close(scored.log_prob, out.log_prob)


def test_batched_equals_single_steps():
    _, schedule = schedules(10, noise_level=0.7)[1]
    generator = torch.Generator().manual_seed(2)
    sample, model_output, action = (torch.randn(3, 16, 4, 4, generator=generator) for _ in range(3))
    timesteps = schedule.timesteps[[0, 4, 9]]
    batched = flow_step_with_logprob(schedule, model_output, timesteps, sample, prev_sample=action)
    for i in range(3):
        single = flow_step_with_logprob(
            schedule, model_output[i : i + 1], timesteps[i : i + 1], sample[i : i + 1], prev_sample=action[i : i + 1]
        )
        torch.testing.assert_close(single.log_prob, batched.log_prob[i : i + 1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(single.mean, batched.mean[i : i + 1], rtol=1e-6, atol=1e-6)


def test_sde_window_is_the_ode_outside():
    _, schedule = schedules(8, noise_level=0.7)[0]
    windowed = schedule.with_sde_window(2, 3)  # SDE on steps 2, 3, 4
    assert windowed.noise_levels.tolist() == [0, 0, 0.7, 0.7, 0.7, 0, 0, 0]
    _, ode = schedules(8, noise_level=0.0)[0]
    sample, model_output = torch.randn(8, 16, 4, 4), torch.randn(8, 16, 4, 4)
    out = flow_step_with_logprob(windowed, model_output, windowed.timesteps, sample)
    reference = flow_step_with_logprob(ode, model_output, ode.timesteps, sample)
    outside = [0, 1, 5, 6, 7]
    assert torch.equal(out.prev_sample[outside], reference.prev_sample[outside])
    assert not out.log_prob[outside].any() and (out.std[2:5] > 0).all()
    assert not torch.equal(out.prev_sample[2:5], reference.prev_sample[2:5])


@pytest.mark.parametrize("noise_level", [0.7, 1.0])
def test_sde_preserves_the_marginals(noise_level):
    """Gaussian data x_0 ~ N(0, s²): x_σ ~ N(0, (1-σ)² s² + σ²) and the exact velocity is linear in x.

    From x_1 ~ N(0, 1), the SDE with the exact velocity must end with variance s² (up to the Euler–Maruyama
    and Monte-Carlo errors, ~2 % here), while adding the same noise to the ODE step without the score
    correction inflates the variance several times over.
    """
    s2, num_steps = 0.25, 100
    schedule = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(**SD3_CONFIG), num_steps, noise_level)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:  # E[ε - x_0 | x_σ = x]
        return (sigma - (1 - sigma) * s2) / ((1 - sigma) ** 2 * s2 + sigma**2) * x

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 40000, dtype=torch.float64, generator=generator)  # one "sample" of 40k independent dims
    naive = x.clone()
    for k in range(num_steps):
        sigma, t = float(schedule.sigmas[k]), schedule.timesteps[k : k + 1]
        x = flow_step_with_logprob(schedule, velocity(x, sigma), t, x, generator=generator).prev_sample
        out = flow_step_with_logprob(schedule, velocity(naive, sigma), t, naive)
        ode_step = naive + (schedule.sigmas[k + 1] - sigma) * velocity(naive, sigma)
        naive = ode_step + out.std * torch.randn(naive.shape, generator=generator, dtype=naive.dtype)
    assert float(x.var()) == pytest.approx(s2, rel=0.05)
    assert float(naive.var()) > 3 * s2


def test_errors_name_the_problem():
    _, schedule = schedules(10, noise_level=0.7)[0]
    with pytest.raises(ValueError, match="not steps of this schedule"):
        flow_step_with_logprob(schedule, torch.zeros(1, 4), torch.tensor([123]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="pass mu"):
        FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG), 10)
    with pytest.raises(ValueError, match="round to the same integer"):
        FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(**SD3_CONFIG), 1000)
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(), 10, noise_level=-1.0)
