"""The stochastic DDIM step against diffusers' DDIMScheduler and torch.distributions."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_mdp.ddim import DDIMSchedule, ddim_step_with_logprob, gaussian_log_prob
from diffusion_mdp.testing import SD_SCHEDULER_CONFIG

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def make_scheduler(prediction_type: str = "epsilon", **overrides) -> DDIMScheduler:
    return DDIMScheduler(**{**SD_SCHEDULER_CONFIG, **overrides}, prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_mean_equals_scheduler_step_at_every_step(prediction_type: str, eta: float) -> None:
    scheduler = make_scheduler(prediction_type)
    schedule = DDIMSchedule.from_scheduler(scheduler, num_steps=50, eta=eta)
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps:
        model_output = torch.randn(3, 4, 8, 8, generator=generator)
        expected = scheduler.step(model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample))
        ours = ddim_step_with_logprob(schedule, model_output, t.repeat(3), sample)
        # float32 rounding: our α's are cast from float64, diffusers' are float32 products; with "sample"
        # prediction ε̂ = (x_t - √α x̂_0)/√(1-α) amplifies that rounding at small t, hence atol 1e-4.
        torch.testing.assert_close(ours.mean, expected.prev_sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.pred_original_sample, expected.pred_original_sample, rtol=1e-4, atol=1e-4)
        # σ_t is η times the square root of the scheduler's own variance.
        prev_t = t - scheduler.config.num_train_timesteps // 50
        std = eta * scheduler._get_variance(t, prev_t) ** 0.5
        torch.testing.assert_close(ours.std.flatten(), std.float().repeat(3), rtol=1e-5, atol=1e-7)
        sample = ours.prev_sample


def test_sampling_equals_scheduler_step_with_the_same_noise() -> None:
    scheduler = make_scheduler()
    schedule = DDIMSchedule.from_scheduler(scheduler, num_steps=20)
    scheduler.set_timesteps(20)
    sample, model_output, noise = torch.randn(3, 2, 4, 4, 4).unbind(0)
    t = scheduler.timesteps[5]
    expected = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=noise).prev_sample
    ours = ddim_step_with_logprob(schedule, model_output, t.repeat(2), sample, noise=noise).prev_sample
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_per_sample_timesteps_equal_separate_calls() -> None:
    scheduler = make_scheduler("v_prediction")
    schedule = DDIMSchedule.from_scheduler(scheduler, num_steps=10)
    timesteps = schedule.timesteps[[0, 4, 9]]  # first, middle, final step in one batch
    sample, model_output, action = torch.randn(3, 3, 4, 5, 5).unbind(0)
    batched = ddim_step_with_logprob(schedule, model_output, timesteps, sample, prev_sample=action)
    for i in range(3):
        single = ddim_step_with_logprob(
            schedule, model_output[i : i + 1], timesteps[i : i + 1], sample[i : i + 1], prev_sample=action[i : i + 1]
        )
        torch.testing.assert_close(batched.mean[i : i + 1], single.mean)
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(reduction: str) -> None:
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), num_steps=20)
    timesteps = schedule.timesteps[[1, 19]]
    sample, model_output, action = torch.randn(3, 2, 4, 6, 6, dtype=torch.float64).unbind(0)
    out = ddim_step_with_logprob(schedule, model_output, timesteps, sample, prev_sample=action, reduction=reduction)
    normal = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
    per_dim = normal.log_prob(action)
    expected = per_dim.mean(dim=(1, 2, 3)) if reduction == "mean" else per_dim.sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected)


def test_sum_is_num_dims_times_mean() -> None:
    x, mean = torch.randn(2, 2, 3, 4, 4).unbind(0)
    std = torch.full((2, 1, 1, 1), 0.3)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, "sum"), 48 * gaussian_log_prob(x, mean, std, "mean"))


def test_log_prob_gradient_flows_through_the_mean_only() -> None:
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), num_steps=10)
    model_output = torch.randn(2, 4, 4, 4, requires_grad=True)
    sample = torch.randn(2, 4, 4, 4)
    out = ddim_step_with_logprob(schedule, model_output, schedule.timesteps[:2], sample)
    out.log_prob.sum().backward()
    assert model_output.grad is not None and model_output.grad.abs().sum() > 0


def test_final_step_uses_alpha_zero_for_sd_configs() -> None:
    """With set_alpha_to_one=False (SD), the last step's α_prev is α_0 — the authors' clamp agrees."""
    scheduler = make_scheduler()
    schedule = DDIMSchedule.from_scheduler(scheduler, num_steps=20)
    final_t = schedule.timesteps[-1:]
    _, alpha_prev = schedule.alphas_at(final_t)
    assert alpha_prev.item() == pytest.approx(scheduler.alphas_cumprod[0].item())


def test_set_alpha_to_one_with_eta_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        DDIMSchedule.from_scheduler(make_scheduler(set_alpha_to_one=True), num_steps=20, eta=1.0)


def test_eta_zero_is_deterministic_and_has_no_log_prob() -> None:
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), num_steps=10, eta=0.0)
    sample, model_output = torch.randn(2, 2, 4, 4, 4).unbind(0)
    a = ddim_step_with_logprob(schedule, model_output, schedule.timesteps[:2], sample)
    b = ddim_step_with_logprob(schedule, model_output, schedule.timesteps[:2], sample)
    assert a.log_prob is None
    torch.testing.assert_close(a.prev_sample, b.prev_sample)
    with pytest.raises(ValueError, match="deterministic"):
        ddim_step_with_logprob(schedule, model_output, schedule.timesteps[:2], sample, prev_sample=sample)


def test_bad_shapes_raise() -> None:
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), num_steps=10)
    with pytest.raises(ValueError, match="timestep must have shape"):
        ddim_step_with_logprob(schedule, torch.randn(2, 4, 4, 4), schedule.timesteps[:1], torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="num_steps"):
        DDIMSchedule.from_scheduler(make_scheduler(), num_steps=0)


def test_sde_window_is_deterministic_ddim_outside() -> None:
    """Inside the window the step is the η schedule's (same mean, std, log-prob); outside it is η = 0's."""
    scheduler = make_scheduler()
    stochastic = DDIMSchedule.from_scheduler(scheduler, num_steps=8, eta=1.0)
    deterministic = DDIMSchedule.from_scheduler(scheduler, num_steps=8, eta=0.0)
    windowed = stochastic.with_sde_window(2, 3)  # η on steps 2, 3, 4
    assert windowed.etas(windowed.timesteps).tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert (windowed.std_dev_t(windowed.timesteps) > 0).tolist() == [False] * 2 + [True] * 3 + [False] * 3
    sample, model_output, noise = torch.randn(3, 8, 4, 6, 6).unbind(0)
    t = windowed.timesteps
    out = ddim_step_with_logprob(windowed, model_output, t, sample, noise=noise)
    inside, outside = [2, 3, 4], [0, 1, 5, 6, 7]
    reference = ddim_step_with_logprob(deterministic, model_output, t, sample)
    assert torch.equal(out.prev_sample[outside], reference.prev_sample[outside])
    assert not out.log_prob[outside].any()  # the marker 0: no density outside
    full = ddim_step_with_logprob(stochastic, model_output, t, sample, noise=noise)
    torch.testing.assert_close(out.prev_sample[inside], full.prev_sample[inside], rtol=0, atol=0)
    torch.testing.assert_close(out.log_prob[inside], full.log_prob[inside], rtol=0, atol=0)
    scored = ddim_step_with_logprob(windowed, model_output, t, sample, prev_sample=out.prev_sample)
    torch.testing.assert_close(scored.log_prob, out.log_prob)


def test_sde_window_must_lie_within_the_steps() -> None:
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), num_steps=4)
    with pytest.raises(ValueError, match="sde_window"):
        schedule.with_sde_window(3, 2)
    with pytest.raises(ValueError, match="not steps of this schedule"):
        schedule.with_sde_window(0, 2).etas(torch.tensor([schedule.timesteps[0] + 1]))
