"""SDXL-structured pipelines: loading, the policy's conditioning (= diffusers'), an episode, a training step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_mdp.ddim import DDIMSchedule
from diffusion_mdp.models import ModelNotAvailableError, load_components
from diffusion_mdp.policy import DiffusionPolicy

PROMPTS = ["a red circle", "two blue squares"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusion_mdp.testing import build_reference_tiny_sdxl_pipeline

    return build_reference_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def sdxl_components(sdxl_folder: Path):
    return load_components(sdxl_folder)


def test_load_detects_sdxl(sdxl_components, reference_components):
    c = sdxl_components
    assert c.is_sdxl and c.text_encoder_2 is not None and c.tokenizer_2 is not None
    assert c.force_zeros_for_empty_prompt
    # The Euler config is read as DDIM with SD's conventions (no clipping, ᾱ_prev of the last step = ᾱ_0).
    assert not c.scheduler.config.clip_sample and not c.scheduler.config.set_alpha_to_one
    assert c.scheduler.config.timestep_spacing == "leading"
    assert c.latent_shape == (4, 32, 32) and c.image_size == (64, 64)
    assert not reference_components.is_sdxl


def test_missing_sdxl_hub_model_error_names_it():
    with pytest.raises(ModelNotAvailableError, match=r"stabilityai-test/no-such-sdxl.*huggingface-cli download"):
        load_components("stabilityai-test/no-such-sdxl")


def test_policy_conditioning_equals_diffusers(sdxl_folder: Path, sdxl_components):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    policy = DiffusionPolicy(sdxl_components, DDIMSchedule.from_scheduler(sdxl_components.scheduler, 4), 5.0)
    packed = policy.encode_prompts(PROMPTS)
    assert packed.shape == (2, 16 + 1, 64)
    hidden, pooled = policy.unpack_sdxl(packed)
    with torch.no_grad():
        embeds, neg_embeds, pooled_ref, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    torch.testing.assert_close(hidden, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, pooled_ref, atol=1e-5, rtol=1e-5)
    assert not neg_embeds.any() and not neg_pooled.any()  # force_zeros_for_empty_prompt
    # The guided model output = diffusers' CFG with added_cond_kwargs {text_embeds, time_ids}.
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([901, 501])
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, 32).repeat(4, 1)
    with torch.no_grad():
        ours = policy.predict(latents, timesteps, packed)
        out = pipe.unet(
            torch.cat([latents, latents]),
            torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([neg_embeds, embeds]),
            added_cond_kwargs={"text_embeds": torch.cat([neg_pooled, pooled_ref]), "time_ids": time_ids},
        ).sample
    uncond, cond = out.chunk(2)
    torch.testing.assert_close(ours, uncond + 5.0 * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_sdxl_episode(sdxl_folder: Path):
    import gymnasium as gym

    env = gym.make_vec("DenoisingMDP-v0", num_envs=2, model=str(sdxl_folder), prompts=PROMPTS, num_steps=3)
    policy = DiffusionPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        actions, log_probs = policy.sample(obs, generator=generator)
        assert actions.shape == (2, 4, 32, 32) and torch.isfinite(log_probs).all()
        torch.testing.assert_close(policy.log_prob(obs, actions), log_probs, atol=1e-5, rtol=1e-5)
        obs, rewards, terminations, _, info = env.step(actions)
        assert terminations.all() == (step == 2)
    assert rewards.shape == (2,) and np.isfinite(rewards).all()
    assert info["image"].shape == (2, 64, 64, 3)


def test_sdxl_training_step(sdxl_folder: Path, tmp_path: Path):
    from diffusion_mdp.agents import TrainConfig, make_agent

    cfg = TrainConfig(
        name="sdxl",
        output_dir=str(tmp_path),
        model=str(sdxl_folder),
        prompts="",
        reward="jpeg_compressibility",
        num_steps=2,
        num_epochs=1,
        samples_per_epoch=2,
        sample_batch_size=2,
        train_batch_size=2,
        stat_min_count=2,
        learning_rate=1e-2,
        clip_range=0.2,
        progress_bar=False,
        log_formats="csv",
        gradient_checkpointing=True,
    )
    agent = make_agent(cfg)
    assert agent.unet.is_gradient_checkpointing
    assert agent.buffer.embed_shape == (17, 64)  # packed: 16 tokens + the pooled row
    before = {n: p.detach().clone() for n, p in agent.unet.named_parameters() if p.requires_grad}
    stats = agent.collect_rollouts(0)
    metrics = agent.train_on_rollouts(0)
    assert np.isfinite(stats["reward_mean"]) and metrics["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    changed = [n for n, p in agent.unet.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora" in n for n in changed)


def test_8bit_adam_needs_bitsandbytes():
    import importlib.util

    from diffusion_mdp.agents import ConfigError, TrainConfig

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(ConfigError, match="use_8bit_adam=true needs bitsandbytes"):
        TrainConfig(use_8bit_adam=True).validate()
