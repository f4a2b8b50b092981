"""Stable-Baselines3 on a flow-matching model (the bundled ``tiny-shapes-flow``): float time observations.

``diffusion_mdp.envs.flow_time``: the SB3 adapter observes a flow model's exact model time t = 1000 σ and σ
as floats (DDIM models keep their integer t); SB3's ``check_env`` accepts the single env observed the same way,
PPO learns on the adapter, and its log-probabilities are the library policy's at the step the time names.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

import diffusion_mdp  # noqa: F401  (registers DenoisingMDP-v0)
from diffusion_mdp.envs.flow_time import FlowTimeObservation, flow_time, policy_timesteps
from diffusion_mdp.envs.sb3 import DiffusionActorCriticPolicy, ddpo_ppo_kwargs, diffusion_policy_kwargs, make_sb3_env
from diffusion_mdp.models import load_components
from diffusion_mdp.policy import DiffusionPolicy

NUM_STEPS = 3  # the schedule's model times are 1000, 500.5, 1: one of them is not an integer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def flow_components() -> Any:
    return load_components("tiny-shapes-flow")


def test_check_env_accepts_the_single_flow_env(flow_components: Any) -> None:
    from stable_baselines3.common.env_checker import check_env

    env = FlowTimeObservation(
        gym.make("DenoisingMDP-v0", components=flow_components, num_steps=NUM_STEPS).unwrapped
    )
    schedule = env.unwrapped.mdp.schedule
    assert isinstance(env.observation_space["timestep"], spaces.Box)
    assert env.observation_space["timestep"].high == schedule.num_train_timesteps
    assert isinstance(env.observation_space["sigma"], spaces.Box) and env.observation_space["sigma"].high == 1.0
    check_env(env, warn=False)  # raises on observations outside their spaces, wrong dtypes, ...
    obs, _ = env.reset(seed=0)
    seen = [(obs["timestep"].item(), obs["sigma"].item())]
    terminated = False
    while not terminated:
        obs, _, terminated, _, _ = env.step(obs["latent"])
        seen.append((obs["timestep"].item(), obs["sigma"].item()))
    expected = [(float(t), float(s)) for t, s in zip(schedule.model_timesteps, schedule.sigmas, strict=False)]
    np.testing.assert_allclose(seen, expected + [(0.0, 0.0)], rtol=1e-6)
    assert any(t != round(t) for t, _ in seen)  # the exact time, not the rounded integer the env carries


def test_sb3_adapter_observes_float_times_and_ppo_learns() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.utils import obs_as_tensor

    components = load_components("tiny-shapes-flow")  # trained here: its own copy (LoRA added in place)
    env = make_sb3_env(2, components=components, num_steps=NUM_STEPS, reward="jpeg_compressibility")
    schedule = env.venv.schedule
    assert env.observation_space["timestep"].dtype == np.float32 and "sigma" in env.observation_space.spaces
    kwargs = diffusion_policy_kwargs(env, guidance_scale=1.0, lora_rank=2)
    diffusion: DiffusionPolicy = kwargs["diffusion_policy"]
    model = PPO(DiffusionActorCriticPolicy, env, **ddpo_ppo_kwargs(env, clip_range=0.2, seed=0), policy_kwargs=kwargs)

    obs = env.reset()
    obs = env.step(np.zeros((2, *env.venv.mdp.latent_shape), np.float32))[0]  # step k = 1: t = 500.5
    assert obs["timestep"].dtype == np.float32 and obs["timestep"].shape == (2, 1)
    assert obs["timestep"].ravel() == pytest.approx([500.5, 500.5], abs=1e-3)
    torch.manual_seed(0)
    with torch.no_grad():
        actions, _, sb3_log_prob = model.policy(obs_as_tensor(obs, "cpu"))
        prompts = [env.prompts[i] for i in obs["prompt_id"]]
        reference_obs = {"latent": obs["latent"], "timestep": schedule.timesteps[[1, 1]], "prompt": prompts}
        reference = diffusion.log_prob(reference_obs, actions)
        # The training path: SB3's buffer hands back the (B, 1) float32 times.
        buffer_obs = {key: torch.as_tensor(value) for key, value in obs.items()}
        _, train_log_prob, _ = model.policy.evaluate_actions(buffer_obs, actions.flatten(1))
    torch.testing.assert_close(sb3_log_prob, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(train_log_prob, reference, rtol=0, atol=1e-6)

    lora = {n: p.detach().clone() for n, p in model.policy.named_parameters() if "lora_B" in n}
    model.learn(total_timesteps=2 * NUM_STEPS)  # one rollout of N = 2 episodes x T = 3 steps, one PPO update
    assert model.num_timesteps == 2 * NUM_STEPS
    changed = [n for n, p in model.policy.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert lora and changed, "PPO's update did not touch the LoRA weights"


def test_times_map_back_to_their_steps(flow_components: Any) -> None:
    env = gym.make("DenoisingMDP-v0", components=flow_components, num_steps=10)
    schedule = env.unwrapped.mdp.schedule
    t, sigma = flow_time(schedule, schedule.timesteps.numpy())  # the env's integers -> exact floats
    np.testing.assert_allclose(t, schedule.model_timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(sigma, schedule.sigmas[:-1].numpy(), rtol=1e-6)
    # float32 times (as SB3 stores them) name the same steps as the env's integers, also at x.5 boundaries
    assert torch.equal(policy_timesteps(schedule, torch.as_tensor(t)[:, None]), schedule.timesteps)
    with pytest.raises(ValueError, match="not steps of this schedule"):
        policy_timesteps(schedule, torch.tensor([schedule.model_timesteps[0].item() - 3.0]))


def test_ddim_models_keep_integer_timesteps(reference_components: Any) -> None:
    env = make_sb3_env(2, components=reference_components, num_steps=2, reward="jpeg_compressibility")
    assert isinstance(env.observation_space["timestep"], spaces.Discrete) and "sigma" not in env.observation_space
    obs = env.reset()
    assert obs["timestep"].dtype == np.int64
    assert torch.equal(policy_timesteps(env.venv.schedule, torch.tensor([[981.0]])), torch.tensor([981]))
