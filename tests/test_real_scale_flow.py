"""SD3- and FLUX-structured pipelines: loading, the policy (= diffusers' pipelines), an episode, a training step."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import diffusion_mdp  # noqa: F401  (registers DenoisingMDP-v0)
from diffusion_mdp.agents.base import sample_deterministic
from diffusion_mdp.families import flux as flux_family
from diffusion_mdp.flow import FlowMatchSchedule
from diffusion_mdp.models import ModelNotAvailableError, load_components
from diffusion_mdp.policy import DiffusionPolicy

PROMPTS = ["a red circle", "two blue squares"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusion_mdp.testing import build_reference_tiny_sd3_pipeline

    return build_reference_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusion_mdp.testing import build_reference_tiny_flux_pipeline

    return build_reference_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux"))


def test_load_detects_sd3_and_flux(sd3_folder: Path, flux_folder: Path, tmp_path: Path):
    sd3 = load_components(sd3_folder)
    assert sd3.family == "sd3" and not sd3.is_sdxl and type(sd3.unet).__name__ == "SD3Transformer2DModel"
    assert sd3.text_encoder_3 is not None and sd3.latent_shape == (16, 8, 8) and sd3.image_size == (16, 16)
    flux = load_components(flux_folder)
    assert flux.family == "flux" and type(flux.unet).__name__ == "FluxTransformer2DModel"
    assert flux.latent_shape == (16, 8, 8) and flux.image_size == (16, 16)
    assert type(sd3.scheduler).__name__ == type(flux.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    # SD3 saved without its T5 (diffusers allows it): T5's embeddings are zeros.
    from diffusion_mdp.testing import build_reference_tiny_sd3_pipeline

    no_t5 = load_components(build_reference_tiny_sd3_pipeline(tmp_path / "no-t5", t5=False))
    assert no_t5.family == "sd3" and no_t5.text_encoder_3 is None
    policy = DiffusionPolicy(no_t5, FlowMatchSchedule.from_scheduler(no_t5.scheduler, 3), 5.0)
    embeds = policy.encode_prompts(PROMPTS)
    clip_len = no_t5.tokenizer.model_max_length
    assert embeds.shape == (2, clip_len + 256 + 1, 48) and not embeds[:, clip_len:-1].any()


def test_missing_hub_models_error_names_them():
    for name in ("stabilityai-test/no-such-sd3", "black-forest-labs-test/no-such-flux"):
        with pytest.raises(ModelNotAvailableError, match=rf"{name}.*huggingface-cli download"):
            load_components(name)


def test_sd3_policy_equals_the_diffusers_pipeline(sd3_folder: Path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    components = load_components(sd3_folder)
    policy = DiffusionPolicy(components, FlowMatchSchedule.from_scheduler(components.scheduler, 3), 5.0)
    packed = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS)
    assert packed.shape == (2, components.tokenizer.model_max_length + 256 + 1, 48)
    torch.testing.assert_close(packed[:, :-1], embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(packed[:, -1, :32], pooled, atol=1e-6, rtol=1e-6)
    # Whole sampling runs: our ODE (noise level 0) with CFG w = 5 ends where the pipeline does.
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sample_deterministic(policy, noise, PROMPTS, 3)
        reference = pipe(
            PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=5.0, latents=noise, output_type="latent"
        ).images
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_flux_policy_equals_the_diffusers_pipeline(flux_folder: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_folder)
    components = load_components(flux_folder)
    schedule = flux_family.make_schedule(components, 3, 0.7)
    policy = DiffusionPolicy(components, schedule, guidance_scale=3.5)
    packed = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS)
    torch.testing.assert_close(packed[:, :-1], embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(packed[:, -1, :16], pooled, atol=1e-6, rtol=1e-6)
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(flux_family.pack_latents(noise), pipe._pack_latents(noise, 2, 16, 8, 8))
    with torch.no_grad():
        ours = sample_deterministic(policy, noise, PROMPTS, 3)
        reference = pipe(
            PROMPTS,
            height=16,
            width=16,
            num_inference_steps=3,
            guidance_scale=3.5,
            latents=flux_family.pack_latents(noise),
            output_type="latent",
        ).images
    torch.testing.assert_close(ours, flux_family.unpack_latents(reference, 8, 8), atol=1e-5, rtol=1e-5)
    # No unconditional branch: one call, the guidance scale is the network's input.
    timesteps = schedule.timesteps[:2]
    with torch.no_grad():
        out_default, out_w1 = (policy.predict(noise, timesteps, packed, w) for w in (None, 1.0))
    assert out_default.shape == noise.shape and not torch.allclose(out_default, out_w1)
    # The dynamic shift μ of the pipeline's schedule (16 packed tokens) is the one our schedule used.
    assert schedule.mu == pytest.approx(flux_family.image_seq_len(components) * (0.65 / 3840) + 0.5 - 256 * 0.65 / 3840)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_episode(family: str, sd3_folder: Path, flux_folder: Path):
    folder = sd3_folder if family == "sd3" else flux_folder
    env = gym.make("DenoisingMDP-v0", model=str(folder), prompts=PROMPTS, num_steps=3, eta=0.7)
    policy = DiffusionPolicy.from_env(env, guidance_scale=3.5)
    obs, _ = env.reset(seed=0)
    assert env.observation_space["timestep"].contains(obs["timestep"]) and obs["timestep"] == 1000
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        actions, log_probs = policy.sample(obs, generator=generator)
        assert actions.shape == (1, 16, 8, 8) and torch.isfinite(log_probs).all()
        torch.testing.assert_close(policy.log_prob(obs, actions), log_probs, atol=1e-5, rtol=1e-5)
        obs, reward, terminated, truncated, info = env.step(actions[0].numpy())
        assert terminated == (step == 2) and not truncated
    assert np.isfinite(reward) and info["image"].shape == (16, 16, 3)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_training_step(family: str, sd3_folder: Path, flux_folder: Path, tmp_path: Path):
    from diffusion_mdp.agents import TrainConfig, make_agent
    from diffusion_mdp.agents.base import export_lora

    cfg = TrainConfig(
        name=family,
        output_dir=str(tmp_path),
        model=str(sd3_folder if family == "sd3" else flux_folder),
        prompts="",
        reward="jpeg_compressibility",
        num_steps=2,
        eta=0.7,
        guidance_scale=3.5,
        num_epochs=1,
        samples_per_epoch=2,
        sample_batch_size=2,
        train_batch_size=2,
        stat_min_count=2,
        learning_rate=1e-2,
        clip_range=0.2,
        progress_bar=False,
        log_formats="csv",
        eval_num_samples=2,
    )
    agent = make_agent(cfg)
    before = {n: p.detach().clone() for n, p in agent.unet.named_parameters() if p.requires_grad}
    stats = agent.collect_rollouts(0)
    metrics = agent.train_on_rollouts(0)
    assert np.isfinite(stats["reward_mean"]) and metrics["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    changed = [n for n, p in agent.unet.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora" in n for n in changed)
    assert np.isfinite(agent.evaluate()["eval_reward_mean"])  # the ODE evaluation path
    # The adapter loads into the diffusers pipeline of its family.
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    folder = export_lora(agent.unet, tmp_path / "lora", family)
    pipe = (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline).from_pretrained(cfg.model)
    pipe.load_lora_weights(folder)
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
