"""The env as the interface: Gymnasium's own tools and other RL libraries run on it as they are.

Each test drives the env the way a new user of that library would, on the reference tiny pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import diffusion_mdp  # noqa: F401  (registers DenoisingMDP-v0)
from diffusion_mdp.models import load_components

from .conftest import PROMPTS

NUM_STEPS = 3


def brightness(images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> tuple[np.ndarray, dict]:
    """A reward computed from the images alone: mean pixel value in [0, 1]."""
    return images.reshape(len(images), -1).mean(1) / 255.0, {"mean_pixel": images.reshape(len(images), -1).mean(1)}


def make_vec(components: Any, num_envs: int = 2, **kwargs: Any) -> Any:
    kwargs = {"prompts": PROMPTS, "num_steps": NUM_STEPS, "reward": brightness, **kwargs}
    return gym.make_vec("DenoisingMDP-v0", num_envs=num_envs, components=components, **kwargs)


def play(envs: Any, num_calls: int, seed: int = 5) -> list[tuple[Any, ...]]:
    """``num_calls`` steps with the action 0.9 x_t, from ``reset(seed=seed)``; returns every call's results."""
    obs, info = envs.reset(seed=seed)
    calls: list[tuple[Any, ...]] = [(obs, None, None, info)]
    for _ in range(num_calls):
        obs, rewards, terminations, _, info = envs.step(0.9 * np.asarray(obs["latent"]))
        calls.append((obs, rewards, terminations, info))
    return calls


# --------------------------------------------------------------------------------------------------
# Gymnasium
# --------------------------------------------------------------------------------------------------
def test_vector_env_has_gymnasium_autoreset_attribute_and_metadata(reference_components: Any) -> None:
    envs = make_vec(reference_components)
    assert envs.autoreset_mode == AutoresetMode.NEXT_STEP == envs.metadata["autoreset_mode"]
    assert make_vec(reference_components, autoreset_mode="Disabled").autoreset_mode == AutoresetMode.DISABLED
    with pytest.raises(ValueError, match="autoreset_mode must be one of"):
        make_vec(reference_components, autoreset_mode="EveryStep")


def test_gymnasium_vector_wrappers_chain_over_a_full_episode(reference_components: Any) -> None:
    from gymnasium.wrappers import vector as vw

    envs = make_vec(reference_components)
    envs = vw.FilterObservation(envs, ["latent", "timestep"])
    envs = vw.FlattenObservation(envs)
    envs = vw.NormalizeObservation(envs)
    envs = vw.RecordEpisodeStatistics(envs)
    envs = vw.DictInfoToList(envs)
    obs, infos = envs.reset(seed=0)
    assert obs.shape == (2, 4 * 32 * 32 + 1000) and all(info["prompt"] in PROMPTS for info in infos)
    for k in range(NUM_STEPS):
        obs, rewards, terminations, _, infos = envs.step(envs.action_space.sample() * 0)
        assert np.isfinite(obs).all() and terminations.all() == (k == NUM_STEPS - 1)
    assert [info["episode"]["l"] for info in infos] == [NUM_STEPS, NUM_STEPS]
    np.testing.assert_allclose([info["episode"]["r"] for info in infos], rewards, rtol=1e-6)
    assert all(info["image"].shape == (64, 64, 3) for info in infos)


def test_native_and_sync_vectorization_give_the_same_episodes(reference_components: Any) -> None:
    """Same seeds: same observations, rewards and episode lengths, autoreset step included (NEXT_STEP)."""
    native = make_vec(reference_components)
    sync = make_vec(reference_components, vectorization_mode="sync")
    assert sync.metadata["autoreset_mode"] == native.autoreset_mode
    calls = 2 * NUM_STEPS + 1  # two episodes and the autoreset step between them
    for (n_obs, n_rew, n_term, n_info), (s_obs, s_rew, s_term, s_info) in zip(
        play(native, calls), play(sync, calls), strict=True
    ):
        assert n_obs.keys() == s_obs.keys()
        for key in n_obs:
            np.testing.assert_array_equal(n_obs[key], s_obs[key])
        if n_rew is not None:  # a batched VAE decode may round pixels differently by 1/255
            np.testing.assert_allclose(n_rew, s_rew, rtol=1e-2)
            np.testing.assert_array_equal(n_term, s_term)
        assert n_info.keys() == s_info.keys()
        if "prompt" in n_info:
            assert list(n_info["prompt"]) == list(s_info["prompt"])


def test_vector_info_entries_are_arrays(reference_components: Any) -> None:
    envs = make_vec(reference_components, num_envs=3)
    obs, info = envs.reset(seed=0)
    assert isinstance(info["prompt"], np.ndarray) and info["_prompt"].all()
    for _ in range(NUM_STEPS):
        obs, _, _, _, info = envs.step(obs["latent"])
    assert isinstance(info["prompt"], np.ndarray) and info["prompt"].shape == (3,)
    assert info["image"].shape == (3, 64, 64, 3)
    assert isinstance(info["reward_info"]["mean_pixel"], np.ndarray) and info["_reward_info"].all()


def test_async_vectorization_with_defaults_returns_the_right_prompts(reference_components: Any) -> None:
    """The default (fork) context after torch ran in this process: workers must not hang."""
    envs = make_vec(reference_components, vectorization_mode="async")
    try:
        obs, info = envs.reset(seed=0, options={"prompt_ids": 2})
        assert list(info["prompt"]) == [PROMPTS[2], PROMPTS[2]] and obs["prompt_id"].tolist() == [2, 2]
        for _ in range(NUM_STEPS):
            obs, rewards, terminations, _, info = envs.step(0.9 * obs["latent"])
        assert terminations.all() and list(info["prompt"]) == [PROMPTS[2], PROMPTS[2]]
        assert np.isfinite(rewards).all() and rewards.min() > 0
    finally:
        envs.close()


def test_single_env_spec_to_json_with_components(reference_components: Any, reference_pipeline: Path) -> None:
    env = gym.make("DenoisingMDP-v0", components=reference_components, prompts=PROMPTS, num_steps=2)
    spec = gym.envs.registration.EnvSpec.from_json(env.spec.to_json())
    assert spec.kwargs["model"] == str(reference_components.source) and "components" not in spec.kwargs
    envs = make_vec(reference_components, reward="jpeg_compressibility")
    assert '"num_envs": 2' in envs.spec.to_json()


# --------------------------------------------------------------------------------------------------
# Stable-Baselines3
# --------------------------------------------------------------------------------------------------
def test_sb3_check_env_accepts_the_single_env(reference_components: Any) -> None:
    from stable_baselines3.common.env_checker import check_env

    env = gym.make("DenoisingMDP-v0", components=reference_components, prompts=PROMPTS, num_steps=2)
    # Raises on what SB3 cannot store (a Text observation did: "must be a numpy array"). Its advisory
    # warnings (a (C, h, w) float latent "looks like an image") do not apply to latents.
    check_env(env.unwrapped, warn=False)


@pytest.fixture
def fresh_components(reference_pipeline: Path) -> Any:
    """Components a test may train (the session's shared ones must stay untouched)."""
    return load_components(reference_pipeline)


def test_sb3_a2c_trains_the_lora_with_adamw(fresh_components: Any) -> None:
    from stable_baselines3 import A2C

    from diffusion_mdp.envs.sb3 import (
        DenoisingSB3VecEnv,
        DiffusionActorCriticPolicy,
        ddpo_a2c_kwargs,
        diffusion_policy_kwargs,
    )

    env = DenoisingSB3VecEnv(2, components=fresh_components, prompts=PROMPTS, num_steps=2, reward=brightness)
    model = A2C(
        DiffusionActorCriticPolicy,
        env,
        **ddpo_a2c_kwargs(env, learning_rate=1e-2, seed=0),
        policy_kwargs=diffusion_policy_kwargs(env, guidance_scale=1.0, lora_rank=2),
    )
    assert type(model.policy.optimizer) is torch.optim.AdamW  # not A2C's RMSprop default
    lora = {n: p.detach().clone() for n, p in model.policy.named_parameters() if "lora" in n}
    model.learn(total_timesteps=8)  # two rollouts of N = 2 episodes x T = 2 steps
    changed = [n for n, p in model.policy.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert lora and changed, "A2C's update did not touch the LoRA weights"


def test_vec_monitor_reports_raw_rewards(reference_components: Any) -> None:
    from stable_baselines3.common.vec_env import VecMonitor

    from diffusion_mdp.envs.sb3 import NormalizeTerminalReward, make_sb3_env

    env = make_sb3_env(4, components=reference_components, prompts=PROMPTS, num_steps=2, reward=brightness,
                       monitor=True, reward_normalization="batch")  # fmt: skip
    assert isinstance(env, NormalizeTerminalReward) and isinstance(env.venv, VecMonitor)
    obs = env.reset()
    for _ in range(2):
        obs, rewards, dones, infos = env.step(obs["latent"])
    raw = np.array([info["raw_reward"] for info in infos])
    np.testing.assert_allclose([info["episode"]["r"] for info in infos], raw, rtol=1e-5)
    # The adapter normalises in float32 (SB3's reward dtype): 1e-4 absolute is float32 rounding on values ~1, far
    # below what a wrong formula (no centring, no scaling) would be off by.
    np.testing.assert_allclose(rewards, (raw - raw.mean()) / (raw.std() + 1e-6), rtol=1e-4, atol=1e-4)
    assert dones.all() and raw.min() > 0  # brightness: raw rewards are in (0, 1], normalised ones straddle 0


def test_stock_sb3_policy_warns_that_it_never_trains_the_unet(reference_components: Any) -> None:
    from stable_baselines3 import PPO

    from diffusion_mdp.envs.sb3 import DenoisingSB3VecEnv

    env = DenoisingSB3VecEnv(2, components=reference_components, prompts=PROMPTS, num_steps=2, reward=brightness)
    model = PPO("MultiInputPolicy", env, n_steps=2, batch_size=4, n_epochs=1, device="cpu")
    with pytest.warns(UserWarning, match=r"never updates the diffusion model.*DiffusionActorCriticPolicy"):
        model.learn(total_timesteps=4)


# --------------------------------------------------------------------------------------------------
# TorchRL
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vector", [False, True], ids=["single", "vector"])
def test_torchrl_gym_wrapper_specs_and_rollout(reference_components: Any, vector: bool) -> None:
    pytest.importorskip("torchrl")
    from torchrl.envs import GymWrapper
    from torchrl.envs.utils import check_env_specs

    if vector:  # TorchRL asks vector envs for DISABLED (or SAME_STEP) autoreset
        env = make_vec(reference_components, autoreset_mode="Disabled")
    else:
        env = gym.make("DenoisingMDP-v0", components=reference_components, prompts=PROMPTS, num_steps=NUM_STEPS,
                       reward=brightness)  # fmt: skip
    wrapped = GymWrapper(env)
    check_env_specs(wrapped)
    rollout = wrapped.rollout(NUM_STEPS)
    rewards = rollout["next", "reward"]
    assert rollout["next", "done"][..., -1, :].all() and not rollout["next", "done"][..., :-1, :].any()
    assert (rewards[..., :-1, :] == 0).all() and (rewards[..., -1, :] > 0).all()


# --------------------------------------------------------------------------------------------------
# Your own algorithm: the schedule's API and the example that uses nothing else
# --------------------------------------------------------------------------------------------------
def test_schedule_api_gives_the_policys_gaussian_at_every_step(reference_components: Any) -> None:
    """Normal(schedule.mean(ε, t, x_t), schedule.std_dev_t(t)) is DiffusionPolicy's π, the last step included."""
    from torch.distributions import Normal

    from diffusion_mdp.policy import DiffusionPolicy

    envs = make_vec(reference_components, num_envs=2, num_steps=4, torch_obs=True, autoreset_mode="Disabled")
    schedule = envs.unwrapped.schedule
    policy = DiffusionPolicy.from_env(envs, guidance_scale=1.0)
    obs, info = envs.reset(seed=0)
    cond = policy.encode_prompts(list(info["prompt"]))
    for k in range(4):
        x_t, t = obs["latent"], obs["timestep"]
        with torch.no_grad():
            epsilon = policy.unet(x_t, t, encoder_hidden_states=cond).sample
        pi = Normal(schedule.mean(epsilon, t, x_t), schedule.std_dev_t(t, like=x_t))
        action = pi.sample()
        with torch.no_grad():
            expected = policy.log_prob(obs, action)
        torch.testing.assert_close(pi.log_prob(action).mean(dim=(1, 2, 3)), expected)
        assert int(schedule.t_prev(t)[0]) == (int(schedule.timesteps[k + 1]) if k < 3 else 0)
        assert torch.isfinite(schedule.alpha_prod_t_prev(t)).all() and (schedule.std_dev_t(t) > 0).all()
        obs, *_ = envs.step(action)


def test_no_policy_class_example_trains_the_unet(reference_pipeline: Path, tmp_path: Path, monkeypatch) -> None:
    import json
    import runpy
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "no_policy_class.py"
    argv = ["--model", str(reference_pipeline), "--envs", "2", "--steps", "2", "--iterations", "2",
            "--lr", "1e-3", "--out", str(tmp_path), "--smoke"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["weight_change"] > 0 and np.isfinite([result["reward_first"], result["reward_last"]]).all()
