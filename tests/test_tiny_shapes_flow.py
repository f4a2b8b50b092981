"""The bundled tiny-shapes-flow pipeline and its training code (diffusion_mdp.shapes.train_flow_model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_mdp.shapes import flow_model_path
from diffusion_mdp.shapes import train_flow_model as tfm
from diffusion_mdp.shapes.train_model import vae_config

FLOW_MODEL = flow_model_path()
MICRO = {**tfm.transformer_config(), "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
         "caption_projection_dim": 16, "joint_attention_dim": 32, "pooled_projection_dim": 16}


def _random_micro(seed: int = 0):
    """Micro models with random (not adaLN-zero) weights, so every path through the network matters."""
    tokenizer, te1, te2, transformer = tfm.build_models(None, seed, MICRO)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return tokenizer, te1, te2, transformer


def _ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=tfm.MAX_TOKENS, return_tensors="pt").input_ids


@pytest.mark.parametrize("n_null", [0, 1, 7])
def test_null_token_bias_equals_repeated_zero_tokens(n_null):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    tokenizer, te1, te2, transformer = _random_micro()
    ids = _ids(tokenizer, ["two red circles", "a blue square"])
    x, sigma = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.8])
    dim = MICRO["joint_attention_dim"]
    with torch.no_grad():
        text_n, pooled = tfm.encode_text(te1, te2, ids, dim, null_tokens=n_null)
        transformer.set_attn_processor(JointAttnProcessor2_0())
        ref = transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=text_n,
                          pooled_projections=pooled).sample
        text_1, _ = tfm.encode_text(te1, te2, ids, dim, null_tokens=1)
        transformer.set_attn_processor(tfm.NullTokenAttnProcessor())
        log_n = torch.full((2,), math.log(n_null) if n_null else -math.inf)
        out = transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=text_1,
                          pooled_projections=pooled, joint_attention_kwargs={"null_log_count": log_n}).sample
        plain = transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=text_n,
                            pooled_projections=pooled).sample
    assert ref.abs().mean() > 0.05
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain, ref, rtol=0, atol=0)  # no bias given: exactly diffusers' processor


def test_encode_text_matches_the_pipeline(tmp_path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tokenizer, te1, te2, transformer = _random_micro()
    vae = AutoencoderKL(**vae_config(), shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=vae, text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    prompts = ["three green triangles", ""]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=3)
        ours, ours_pooled = tfm.encode_text(te1, te2, _ids(tokenizer, prompts), MICRO["joint_attention_dim"], 3)
    torch.testing.assert_close(ours, embeds)
    torch.testing.assert_close(ours_pooled, pooled)


def test_flow_matching_loss_trains_a_micro_model():
    tokenizer, te1, te2, transformer = tfm.build_models(None, 0, MICRO)
    transformer.set_attn_processor(tfm.NullTokenAttnProcessor())
    # adaLN-Zero: the untrained model predicts v = 0, so the loss is E‖ε - x_0‖² = 2 for unit-variance data.
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(16, 4, 16, 16, generator=gen), torch.randn(16, 4, 16, 16, generator=gen)
    sigma = torch.rand(16, generator=gen)
    ids = _ids(tokenizer, ["a red circle", "four orange squares"] * 8)
    log_n = tfm.sample_null_log_count(np.random.default_rng(0), 16)
    params = [p for m in (transformer, te1, te2) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(10):
        text, pooled = tfm.encode_text(te1, te2, ids, MICRO["joint_attention_dim"])
        per_sample = tfm.flow_matching_loss(transformer, x0, noise, sigma, text, pooled, log_n)
        assert per_sample.shape == (16,)
        losses.append(per_sample.mean().item())
        opt.zero_grad()
        per_sample.mean().backward()
        opt.step()
    expected = (noise - x0).pow(2).mean().item()
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert losses[-1] < 0.95 * losses[0]


def test_sample_null_log_count_mixes_default_absent_and_random():
    log_n = tfm.sample_null_log_count(np.random.default_rng(0), 2000)
    assert log_n.shape == (2000,)
    assert 0.4 < torch.isclose(log_n, torch.tensor(math.log(256))).float().mean() < 0.6
    assert 0.05 < torch.isinf(log_n).float().mean() < 0.15
    finite = log_n[torch.isfinite(log_n)]
    assert finite.min() >= 0 and finite.max() <= math.log(512) + 1e-6


@pytest.mark.skipif(not (FLOW_MODEL / "model_index.json").is_file(), reason="tiny-shapes-flow not exported")
def test_shipped_folder_loads_offline_and_generates():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(FLOW_MODEL), local_files_only=True)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.transformer.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["two red circles", "a blue square"], num_inference_steps=4, guidance_scale=5.0,
                  max_sequence_length=8, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3)
    assert np.isfinite(images).all() and images.std() > 0.05
    size = sum(f.stat().st_size for f in FLOW_MODEL.rglob("*") if f.is_file())
    assert size < 12e6


def test_null_t5_outputs_exact_zeros():
    tokenizer, encoder = tfm.build_null_t5(24)
    ids = tokenizer(["two red circles", "zebra"], padding="max_length", max_length=7, return_tensors="pt").input_ids
    assert ids.shape == (2, 7) and (ids[0, :3] != tokenizer.unk_token_id).all()
    with torch.no_grad():
        out = encoder(ids)[0]
    assert out.shape == (2, 7, 24)
    assert torch.count_nonzero(out) == 0


@pytest.mark.skipif(not (FLOW_MODEL / "model_index.json").is_file(), reason="tiny-shapes-flow not exported")
def test_shipped_placeholder_t5_changes_nothing():
    from diffusers import StableDiffusion3Pipeline

    with_t5 = StableDiffusion3Pipeline.from_pretrained(str(FLOW_MODEL), local_files_only=True)
    without = StableDiffusion3Pipeline.from_pretrained(str(FLOW_MODEL), local_files_only=True, text_encoder_3=None,
                                                       tokenizer_3=None)
    images = [tfm.sample(p, ["three green triangles"], steps=3, max_sequence_length=4, bf16=False)
              for p in (with_t5, without)]
    np.testing.assert_array_equal(images[0], images[1])


def test_bundled_flow_model_runs_through_the_env_by_name():
    """``model="tiny-shapes-flow"`` resolves to the shipped folder: an SD3-family episode with the flow SDE."""
    from diffusion_mdp.envs import DenoisingVectorEnv
    from diffusion_mdp.policy import DiffusionPolicy

    env = DenoisingVectorEnv(num_envs=2, model="tiny-shapes-flow", reward="shapes_geneval", num_steps=4, eta=0.7,
                             torch_obs=True)
    assert env.components.family == "sd3" and env.components.default_prompts == "shapes_train"
    policy = DiffusionPolicy.from_env(env, guidance_scale=5.0)
    obs, _ = env.reset(seed=0)
    for step in range(4):
        actions, log_probs = policy.sample(obs)
        assert torch.isfinite(log_probs).all()
        obs, rewards, terminations, _, _ = env.step(actions)
        assert bool(terminations.all()) == (step == 3)
    assert set(np.unique(rewards)) <= {0.0, 1.0}
