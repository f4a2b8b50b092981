"""The Gymnasium environments on the reference tiny pipeline."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import diffusion_mdp  # noqa: F401  (registers DenoisingMDP-v0)
from diffusion_mdp.envs import DenoisingEnv, DenoisingVectorEnv
from diffusion_mdp.mdp import EpisodeEndedError, RewardError
from diffusion_mdp.policy import DiffusionPolicy
from diffusion_mdp.rewards.jpeg import jpeg_sizes_kb

from .conftest import PROMPTS

NUM_STEPS = 4


def make_env(reference_components, **kwargs) -> DenoisingEnv:
    kwargs = {"prompts": PROMPTS, "num_steps": NUM_STEPS, **kwargs}
    return gym.make("DenoisingMDP-v0", components=reference_components, **kwargs)


def test_check_env_passes(reference_components) -> None:
    env = make_env(reference_components, render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=False)


def test_gym_make_builds_the_registered_classes(reference_pipeline) -> None:
    env = gym.make("DenoisingMDP-v0", model=reference_pipeline, prompts=PROMPTS, num_steps=2)
    assert isinstance(env.unwrapped, DenoisingEnv)
    venv = gym.make_vec("DenoisingMDP-v0", num_envs=2, model=reference_pipeline, prompts=PROMPTS, num_steps=2)
    assert isinstance(venv, DenoisingVectorEnv) and venv.num_envs == 2
    assert venv.autoreset_mode == venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP


def test_episode_runs_to_a_terminal_reward(reference_components) -> None:
    env = make_env(reference_components)
    obs, reset_info = env.reset(seed=0)
    schedule = env.unwrapped.schedule
    assert obs["timestep"] == schedule.timesteps[0] and set(obs) == {"latent", "timestep", "prompt_id"}
    assert reset_info["prompt"] == PROMPTS[obs["prompt_id"]] == env.unwrapped.prompts[obs["prompt_id"]]
    rewards = []
    for k in range(NUM_STEPS):
        action = 0.5 * obs["latent"]
        obs, reward, terminated, truncated, info = env.step(action)
        np.testing.assert_array_equal(obs["latent"], action)  # the transition is deterministic: s' holds a
        rewards.append(reward)
        assert terminated == (k == NUM_STEPS - 1) and not truncated
    assert rewards[:-1] == [0.0] * (NUM_STEPS - 1)
    assert obs["timestep"] == 0
    image = info["image"]
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    # The default reward is JPEG compressibility of the decoded image.
    assert rewards[-1] == pytest.approx(-jpeg_sizes_kb(image[None])[0])


def test_reset_with_a_seed_is_deterministic(reference_components) -> None:
    env = make_env(reference_components)
    a, _ = env.reset(seed=3)
    b, _ = env.reset(seed=3)
    c, _ = env.reset(seed=4)
    np.testing.assert_array_equal(a["latent"], b["latent"])
    assert not np.array_equal(a["latent"], c["latent"])
    assert a["latent"].std() == pytest.approx(1.0, abs=0.1)  # x_T ~ N(0, I)


def test_vector_env_reproduces_single_envs(reference_components) -> None:
    """A seeded batch of N equals N single environments seeded seed, seed+1, ... under the same actions."""
    n, seed = 3, 11
    venv = DenoisingVectorEnv(
        n, components=reference_components, prompts=PROMPTS, num_steps=NUM_STEPS, autoreset_mode="SameStep"
    )
    singles = [make_env(reference_components) for _ in range(n)]
    vobs, _ = venv.reset(seed=seed)
    sobs = [env.reset(seed=seed + i)[0] for i, env in enumerate(singles)]
    for episode in range(2):  # the second episode comes from SAME_STEP autoreset with the continued RNGs
        for _ in range(NUM_STEPS):
            for i in range(n):
                np.testing.assert_array_equal(vobs["latent"][i], sobs[i]["latent"])
                assert vobs["prompt_id"][i] == sobs[i]["prompt_id"] and vobs["timestep"][i] == sobs[i]["timestep"]
            actions = np.stack([0.9 * o["latent"] + 0.01 for o in sobs])
            vobs, vrew, vterm, _, vinfo = venv.step(actions)
            results = [env.step(actions[i]) for i, env in enumerate(singles)]
            sobs = [r[0] for r in results]
            # Batched VAE convolutions round differently from single ones (pixels may differ by 1/255), so the
            # terminal JPEG sizes agree closely rather than bit for bit; the latents agree exactly.
            np.testing.assert_allclose(vrew, [r[1] for r in results], rtol=1e-2)
            assert list(vterm) == [r[2] for r in results]
        # Terminal: SAME_STEP autoreset returns the next episode's start; the final obs is in info.
        np.testing.assert_array_equal(vinfo["final_obs"]["latent"], np.stack([o["latent"] for o in sobs]))
        single_images = np.stack([r[4]["image"] for r in results]).astype(int)
        assert np.abs(vinfo["final_info"]["image"].astype(int) - single_images).max() <= 1
        sobs = [env.reset()[0] for env in singles]
        assert episode in (0, 1)


def test_autoreset_disabled_requires_reset(reference_components) -> None:
    venv = DenoisingVectorEnv(
        2, components=reference_components, prompts=PROMPTS, num_steps=2, autoreset_mode=AutoresetMode.DISABLED
    )
    obs, _ = venv.reset(seed=0)
    for _ in range(2):
        obs, _rewards, terminations, _, info = venv.step(obs["latent"])
    assert terminations.all() and obs["timestep"].tolist() == [0, 0] and "final_obs" not in info
    with pytest.raises(EpisodeEndedError, match="reset"):
        venv.step(obs["latent"])


def test_torch_fast_mode_keeps_tensors(reference_components) -> None:
    venv = DenoisingVectorEnv(2, components=reference_components, prompts=PROMPTS, num_steps=2, torch_obs=True)
    policy = DiffusionPolicy.from_env(venv, guidance_scale=2.0)
    obs, _ = venv.reset(seed=0)
    assert isinstance(obs["latent"], torch.Tensor) and isinstance(obs["timestep"], torch.Tensor)
    actions, _ = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    obs, rewards, _terminations, _, _ = venv.step(actions)
    torch.testing.assert_close(obs["latent"], actions)
    assert rewards.shape == (2,)


def test_render_decodes_the_current_latent(reference_components) -> None:
    env = make_env(reference_components, render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    venv = DenoisingVectorEnv(2, components=reference_components, prompts=PROMPTS, num_steps=2, render_mode="rgb_array")
    venv.reset(seed=0)
    assert len(venv.render()) == 2


# ----------------------------------------------------------------------------------------------------
# Bad input: each raises a clear error
# ----------------------------------------------------------------------------------------------------
def test_unknown_reward_lists_the_available_ones(reference_components) -> None:
    with pytest.raises(ValueError, match=r"unknown reward 'aesthetics'.*jpeg_compressibility"):
        make_env(reference_components, reward="aesthetics")


def test_unknown_prompt_set_lists_the_available_ones(reference_components) -> None:
    with pytest.raises(ValueError, match=r"unknown prompt set 'animals'.*simple_animals"):
        make_env(reference_components, prompts="animals")


def test_empty_prompt_list(reference_components) -> None:
    with pytest.raises(ValueError, match="empty"):
        make_env(reference_components, prompts=[])


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (np.zeros((4, 16, 16), np.float32), "shape"),
        (np.zeros((4, 32, 32), np.int64), "floating-point"),
        (np.full((4, 32, 32), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_actions(reference_components, action: np.ndarray, message: str) -> None:
    env = make_env(reference_components)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.step(action)


def test_step_after_the_episode_ended(reference_components) -> None:
    env = make_env(reference_components, num_steps=1)
    obs, _ = env.reset(seed=0)
    env.step(obs["latent"])
    with pytest.raises(EpisodeEndedError, match="reset"):
        env.step(obs["latent"])


def test_step_before_reset(reference_components) -> None:
    env = make_env(reference_components)
    with pytest.raises(EpisodeEndedError):
        env.unwrapped.step(np.zeros((4, 32, 32), np.float32))


def test_missing_model_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gym.make("DenoisingMDP-v0", model=tmp_path / "nowhere", prompts=PROMPTS)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing unet"):
        gym.make("DenoisingMDP-v0", model=tmp_path / "half", prompts=PROMPTS)


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (lambda images, prompts, metadata: (np.full(len(images), np.nan), {}), "NaN"),
        (lambda images, prompts, metadata: (np.zeros(1), {}), "returned 1 values for 2"),
        (lambda images, prompts, metadata: 1 / 0, "ZeroDivisionError"),
    ],
)
def test_a_failing_reward_names_itself_and_the_batch(reference_components, reward, message) -> None:
    venv = DenoisingVectorEnv(2, components=reference_components, prompts=PROMPTS, num_steps=1, reward=reward)
    obs, _ = venv.reset(seed=0)
    with pytest.raises(RewardError, match=message) as excinfo:
        venv.step(obs["latent"])
    assert "prompts" in str(excinfo.value)


def test_eta_must_be_positive(reference_components) -> None:
    with pytest.raises(ValueError, match="eta must be > 0"):
        make_env(reference_components, eta=-0.5)
    schedule = make_env(reference_components, eta=0.0).unwrapped.schedule  # η = 0: an evaluation env
    assert float(schedule.std_dev_t(schedule.timesteps[:1])) == 0.0


def test_reset_options_fix_prompts_and_reject_bad_ids(reference_components) -> None:
    venv = DenoisingVectorEnv(2, components=reference_components, prompts=PROMPTS, num_steps=1)
    obs, info = venv.reset(seed=0, options={"prompt_ids": [2, 2]})
    assert list(info["prompt"]) == [PROMPTS[2], PROMPTS[2]] and obs["prompt_id"].tolist() == [2, 2]
    with pytest.raises(ValueError, match="outside the prompt set"):
        venv.reset(seed=0, options={"prompt_ids": [0, 7]})


def test_single_env_honours_the_vector_envs_reset_options(reference_components) -> None:
    env = make_env(reference_components)
    noise = np.full((4, 32, 32), 0.5, np.float32)
    obs, info = env.reset(seed=0, options={"prompt_ids": [1], "noise": noise})
    assert info["prompt"] == PROMPTS[1] and obs["prompt_id"] == 1
    np.testing.assert_array_equal(obs["latent"], noise)
    obs, info = env.reset(options={"prompt_ids": 2})
    assert info["prompt"] == PROMPTS[2]
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"prompt": "a red circle"})


def test_reset_noise_is_the_initial_latent_and_keeps_the_rng_stream(reference_components) -> None:
    """Fixed noise replaces x_T without changing what the generators draw for later episodes."""
    a = DenoisingVectorEnv(2, components=reference_components, prompts=PROMPTS, num_steps=1)
    b = DenoisingVectorEnv(2, components=reference_components, prompts=PROMPTS, num_steps=1)
    noise = torch.randn(2, 4, 32, 32)
    obs_a, _ = a.reset(seed=3, options={"noise": noise})
    b.reset(seed=3)
    np.testing.assert_array_equal(obs_a["latent"], noise.numpy())
    np.testing.assert_array_equal(a.reset()[0]["latent"], b.reset()[0]["latent"])
    with pytest.raises(ValueError, match=r"shape \(2, 4, 32, 32\)"):
        a.reset(options={"noise": torch.randn(3, 4, 32, 32)})


def test_next_step_autoreset_starts_new_episodes_on_the_following_step(reference_components) -> None:
    venv = DenoisingVectorEnv(2, components=reference_components, prompts=PROMPTS, num_steps=2)
    obs, _ = venv.reset(seed=0)
    for _ in range(2):
        obs, rewards, terminations, _, info = venv.step(obs["latent"])
    assert terminations.all() and obs["timestep"].tolist() == [0, 0] and "image" in info
    obs, rewards, terminations, _, info = venv.step(obs["latent"])  # ignored: the autoreset step
    assert not terminations.any() and rewards.tolist() == [0.0, 0.0] and "prompt" in info
    assert obs["timestep"].tolist() == [int(venv.schedule.timesteps[0])] * 2


def test_rng_state_round_trip_reproduces_the_next_episodes(reference_components) -> None:
    venv = DenoisingVectorEnv(2, components=reference_components, prompts=PROMPTS, num_steps=1)
    venv.reset(seed=1)
    state = venv.get_rng_state()
    first = venv.reset()[0]["latent"]
    venv.set_rng_state(state)
    np.testing.assert_array_equal(venv.reset()[0]["latent"], first)
    with pytest.raises(ValueError, match="2 sub-environments"):
        venv.set_rng_state(state[:1])


def test_deferred_reward_returns_images_to_score_later(reference_components) -> None:
    venv = DenoisingVectorEnv(2, components=reference_components, prompts=PROMPTS, num_steps=1, defer_reward=True)
    obs, _ = venv.reset(seed=0)
    _, rewards, terminations, _, info = venv.step(obs["latent"])
    assert terminations.all() and rewards.tolist() == [0.0, 0.0] and "reward_info" not in info
    scored, _ = venv.mdp.score(info["image"], info["prompt"], info["metadata"])
    np.testing.assert_allclose(scored, -jpeg_sizes_kb(info["image"]))
