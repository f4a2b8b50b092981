"""DiffusionPolicy: guidance, prompt cache, sample/log_prob consistency, loading errors."""

from __future__ import annotations

import pytest
import torch

from diffusion_mdp.ddim import DDIMSchedule
from diffusion_mdp.models import ModelNotAvailableError, load_components
from diffusion_mdp.policy import DiffusionPolicy

from .conftest import PROMPTS


@pytest.fixture()
def policy(reference_components) -> DiffusionPolicy:
    schedule = DDIMSchedule.from_scheduler(reference_components.scheduler, num_steps=10)
    return DiffusionPolicy(reference_components, schedule, guidance_scale=4.0)


def observation(policy: DiffusionPolicy, timestep_indices: list[int], seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    n = len(timestep_indices)
    return {
        "latent": torch.randn(n, 4, 32, 32, generator=generator),
        "timestep": policy.schedule.timesteps[timestep_indices],
        "prompt": tuple(PROMPTS[i % len(PROMPTS)] for i in range(n)),
    }


def test_guidance_equals_two_separate_passes(policy: DiffusionPolicy) -> None:
    obs = observation(policy, [0, 3, 9])
    latents, timesteps, embeds = policy.unpack(obs)
    uncond = policy.encode_prompts([""] * 3)
    with torch.no_grad():
        guided = policy.predict(latents, timesteps, embeds)
        eps_c = policy.unet(latents, timesteps, encoder_hidden_states=embeds).sample
        eps_u = policy.unet(latents, timesteps, encoder_hidden_states=uncond).sample
    torch.testing.assert_close(guided, eps_u + 4.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)


def test_unconditional_branch_without_gradient_keeps_the_values_and_drops_its_gradient(policy: DiffusionPolicy) -> None:
    """``unconditional_gradient=False``: the guided output is unchanged, its gradient is w·∂ε_c/∂θ."""
    obs = observation(policy, [0, 3, 9])
    latents, timesteps, embeds = policy.unpack(obs)
    weight = next(p for p in policy.unet.parameters() if p.ndim == 4)  # the first convolution's kernel
    weight.requires_grad_(True)

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(loss, weight)
        return grad

    try:
        exact = policy.predict(latents, timesteps, embeds)
        exact_grad = gradient(exact.square().sum())
        policy.unconditional_gradient = False
        semi = policy.predict(latents, timesteps, embeds)
        torch.testing.assert_close(semi, exact, rtol=1e-4, atol=1e-5)  # the same forward values
        semi_grad = gradient(semi.square().sum())
        eps_c = policy.unet(latents, timesteps, encoder_hidden_states=embeds).sample
        # d/dθ Σ ε̃² with ε_∅ held constant = Σ 2 ε̃ · w ∂ε_c/∂θ
        expected = gradient((2 * semi.detach() * 4.0 * eps_c).sum())
        torch.testing.assert_close(semi_grad, expected, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(semi_grad, exact_grad, rtol=1e-2)
        with torch.no_grad():  # sampling keeps the single 2B call
            torch.testing.assert_close(policy.predict(latents, timesteps, embeds), exact.detach())
    finally:
        policy.unconditional_gradient = True
        weight.requires_grad_(False)


def test_sample_then_log_prob_agree_on_mixed_timesteps(policy: DiffusionPolicy) -> None:
    obs = observation(policy, [0, 5, 9, 2])
    actions, log_probs = policy.sample(obs, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(policy.log_prob(obs, actions), log_probs, rtol=1e-5, atol=1e-5)
    # ... and each sample scored alone gives the same value as in the mixed batch.
    for i in range(4):
        single = {"latent": obs["latent"][i], "timestep": obs["timestep"][i], "prompt": obs["prompt"][i]}
        alone = policy.log_prob(single, actions[i : i + 1])
        torch.testing.assert_close(alone, log_probs[i : i + 1], rtol=1e-4, atol=1e-4)


def test_log_prob_has_gradients_for_the_unet_only(policy: DiffusionPolicy) -> None:
    obs = observation(policy, [1, 2])
    actions, _ = policy.sample(obs)
    policy.unet.requires_grad_(True)
    try:
        policy.log_prob(obs, actions).sum().backward()
        grads = [p.grad for p in policy.unet.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in policy.text_encoder.parameters())
        assert not any(name.startswith("text_encoder") for name in policy.state_dict())
    finally:
        policy.unet.requires_grad_(False)
        policy.unet.zero_grad(set_to_none=True)


def test_prompt_cache_reuses_embeddings(policy: DiffusionPolicy) -> None:
    first = policy.encode_prompts(["a red circle", "two blue squares"])
    calls = []
    handle = policy.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        again = policy.encode_prompts(["two blue squares", "a red circle", "a red circle"])
    finally:
        handle.remove()
    assert calls == []
    torch.testing.assert_close(again[0], first[1])
    torch.testing.assert_close(again[2], first[0])


def test_prompt_embeds_may_replace_prompts(policy: DiffusionPolicy) -> None:
    obs = observation(policy, [4, 4])
    actions, log_probs = policy.sample(obs)
    with_embeds = {**obs, "prompt_embeds": policy.encode_prompts(list(obs["prompt"]))}
    del with_embeds["prompt"]
    torch.testing.assert_close(policy.log_prob(with_embeds, actions), log_probs, rtol=1e-5, atol=1e-5)


def test_guidance_below_one_is_rejected(reference_components) -> None:
    schedule = DDIMSchedule.from_scheduler(reference_components.scheduler, num_steps=2)
    with pytest.raises(ValueError, match="guidance_scale"):
        DiffusionPolicy(reference_components, schedule, guidance_scale=0.5)


def test_unreachable_hub_model_names_the_id_and_the_fix() -> None:
    with pytest.raises(ModelNotAvailableError, match=r"'nobody/no-such-model'.*huggingface-cli download"):
        load_components("nobody/no-such-model")


def test_loading_a_v_prediction_pipeline(tmp_path) -> None:
    from diffusion_mdp.testing import build_reference_tiny_pipeline

    components = load_components(build_reference_tiny_pipeline(tmp_path, prediction_type="v_prediction"))
    schedule = DDIMSchedule.from_scheduler(components.scheduler, num_steps=3)
    assert schedule.prediction_type == "v_prediction"
    policy = DiffusionPolicy(components, schedule)
    actions, log_probs = policy.sample(observation(policy, [0, 1]))
    assert torch.isfinite(actions).all() and torch.isfinite(log_probs).all()
