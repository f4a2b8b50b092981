"""Plugging other algorithms into the MDP: stock SB3 PPO (diffusion_mdp.envs.sb3), the extension point, examples."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.utils import obs_as_tensor

from diffusion_mdp.envs.sb3 import (
    DenoisingSB3VecEnv,
    DiffusionActorCriticPolicy,
    ddpo_ppo_kwargs,
    diffusion_policy_kwargs,
)
from diffusion_mdp.models import load_components
from diffusion_mdp.policy import DiffusionPolicy

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "two blue squares", "three green triangles"]


def brightness(images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> tuple[np.ndarray, dict]:
    """A reward we can compute by hand from the returned images: mean pixel value in [0, 1]."""
    return images.reshape(len(images), -1).mean(1) / 255.0, {}


def make_env(components: Any, num_envs: int = 3, **kwargs: Any) -> DenoisingSB3VecEnv:
    kwargs.setdefault("reward", brightness)
    return DenoisingSB3VecEnv(num_envs=num_envs, components=components, prompts=PROMPTS, num_steps=3, **kwargs)


@pytest.fixture
def fresh_components(reference_pipeline: Path) -> Any:
    """Components a test may train (the session's shared ones must stay untouched)."""
    return load_components(reference_pipeline)


def test_sb3_log_prob_equals_diffusion_policy(reference_components: Any) -> None:
    env = make_env(reference_components)
    diffusion = DiffusionPolicy(reference_components, env.venv.schedule, guidance_scale=3.0)
    model = PPO(
        DiffusionActorCriticPolicy,
        env,
        **ddpo_ppo_kwargs(env),
        policy_kwargs=diffusion_policy_kwargs(env, diffusion_policy=diffusion),
    )
    obs = env.reset()
    obs = env.step(np.zeros((3, *env.venv.mdp.latent_shape), np.float32))[0]  # a state with t < t_T
    torch.manual_seed(0)
    with torch.no_grad():
        actions, values, sb3_log_prob = model.policy(obs_as_tensor(obs, "cpu"))
        reference = diffusion.log_prob({**obs, "prompt": [PROMPTS[i] for i in obs["prompt_id"]]}, actions)
        # The training path: the buffer stores flattened actions and (B, 1) float timesteps / prompt ids.
        buffer_obs = {
            "latent": torch.as_tensor(obs["latent"]),
            "timestep": torch.as_tensor(obs["timestep"], dtype=torch.float32)[:, None],
            "prompt_id": torch.as_tensor(obs["prompt_id"], dtype=torch.float32)[:, None],
        }
        _, train_log_prob, entropy = model.policy.evaluate_actions(buffer_obs, actions.flatten(1))
    assert actions.shape == (3, *env.venv.mdp.latent_shape)
    torch.testing.assert_close(sb3_log_prob, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(train_log_prob, reference, rtol=0, atol=1e-6)
    assert torch.equal(values, torch.zeros(3, 1)) and entropy.shape == (3,)


@pytest.mark.parametrize("value_head", ["none", "per_prompt"])
def test_ppo_advantages_are_the_terminal_reward(reference_components: Any, value_head: str) -> None:
    """γ = λ = 1: every step's advantage is r(x_0, c) - V(s_t) (V ≡ 0, or the per-prompt table)."""
    env = make_env(reference_components, reward_normalization="none")
    diffusion = DiffusionPolicy(reference_components, env.venv.schedule, guidance_scale=1.0)
    model = PPO(
        DiffusionActorCriticPolicy,
        env,
        **ddpo_ppo_kwargs(env, n_steps=6),  # two episodes per env in one rollout
        policy_kwargs={**diffusion_policy_kwargs(env, diffusion_policy=diffusion), "value_head": value_head},
    )
    baseline = torch.tensor([0.1, 0.2, 0.3])
    model.policy.values.weight.data[:, 0] = baseline
    _, callback = model._setup_learn(18, None)
    terminal_rewards = []
    original_step_wait = env.step_wait

    def recording_step_wait() -> Any:
        result = original_step_wait()
        if result[2].all():
            terminal_rewards.append(brightness(env.last_images, [], [])[0])
        return result

    env.step_wait = recording_step_wait  # type: ignore[method-assign]
    prompt_ids = []
    original_add = model.rollout_buffer.add

    def recording_add(obs: Any, *args: Any, **kwargs: Any) -> None:
        prompt_ids.append(np.asarray(obs["prompt_id"]).copy())
        original_add(obs, *args, **kwargs)

    model.rollout_buffer.add = recording_add  # type: ignore[method-assign]
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=6)
    buffer = model.rollout_buffer
    assert len(terminal_rewards) == 2
    for episode, reward in enumerate(terminal_rewards):
        steps = slice(3 * episode, 3 * episode + 3)
        ids = np.stack(prompt_ids[steps])  # (3 steps, N) the prompt of each episode (constant along it)
        v = baseline[ids].numpy() if value_head == "per_prompt" else np.zeros_like(ids, dtype=float)
        np.testing.assert_allclose(buffer.returns[steps], np.broadcast_to(reward, (3, 3)), rtol=1e-5)
        np.testing.assert_allclose(buffer.advantages[steps], reward[None] - v, rtol=1e-5, atol=1e-6)


def test_sb3_env_normalises_terminal_rewards_per_prompt(reference_components: Any) -> None:
    env = make_env(reference_components, num_envs=4, reward_normalization="batch")
    env.seed(0)
    env.reset()
    latent = np.zeros((4, *env.venv.mdp.latent_shape), np.float32)
    for _ in range(2):
        _, rewards, dones, infos = env.step(latent + np.random.default_rng(0).normal(size=latent.shape) * 0.5)
        assert not dones.any() and not rewards.any()
    obs, rewards, dones, infos = env.step(np.random.default_rng(1).normal(size=latent.shape).astype(np.float32))
    raw = np.array([info["episode"]["r"] for info in infos])
    assert dones.all() and np.allclose(raw, env.last_raw_rewards)
    np.testing.assert_allclose(rewards, (raw - raw.mean()) / (raw.std() + 1e-6), rtol=1e-4, atol=1e-5)
    assert set(infos[0]["terminal_observation"]) == {"latent", "timestep", "prompt_id"}
    assert int(infos[0]["terminal_observation"]["timestep"]) == 0 and obs["timestep"][0] > 0


def test_sb3_env_group_sampling_and_group_normalisation(reference_components: Any) -> None:
    """group_size=k: each batch holds k episodes of N/k prompts, in every episode (also after the reset)."""
    env = make_env(reference_components, num_envs=4, group_size=2, reward_normalization="group")
    env.seed(3)
    obs = env.reset()
    latent = np.random.default_rng(0).normal(size=(4, *env.venv.mdp.latent_shape)).astype(np.float32)
    for _ in range(2):  # two episodes: the second starts from the adapter's own reset
        ids = obs["prompt_id"]
        assert ids[0] == ids[1] and ids[2] == ids[3], ids
        for _ in range(3):
            obs, rewards, dones, infos = env.step(latent)
        raw = env.last_raw_rewards
        assert dones.all() and [info["prompt"] for info in infos] == [PROMPTS[i] for i in ids]
        for pair in (slice(0, 2), slice(2, 4)):
            expected = (raw[pair] - raw[pair].mean()) / (raw[pair].std() + 1e-6)
            np.testing.assert_allclose(rewards[pair], expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="divide"):
        make_env(reference_components, num_envs=3, group_size=2)


def test_tiny_ppo_learn_updates_the_lora(fresh_components: Any) -> None:
    env = make_env(fresh_components, num_envs=2)
    model = PPO(
        DiffusionActorCriticPolicy,
        env,
        **ddpo_ppo_kwargs(env, batch_size=3, clip_range=0.2, learning_rate=1e-2, seed=0),
        policy_kwargs=diffusion_policy_kwargs(env, guidance_scale=2.0, lora_rank=2),
    )
    lora = {n: p.detach().clone() for n, p in model.policy.named_parameters() if "lora" in n}
    assert lora and all(not p.requires_grad for n, p in model.policy.named_parameters() if "lora" not in n)
    model.learn(total_timesteps=6)
    assert model.num_timesteps == 6 and len(model.ep_info_buffer) == 2
    changed = [n for n, p in model.policy.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert changed, "PPO's update did not touch the LoRA weights"
    assert np.isfinite(model.logger.name_to_value["train/policy_gradient_loss"])


def run_example(path: Path, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    return runpy.run_path(str(path), run_name="__main__")


@pytest.mark.parametrize(
    "script", ["sb3_ppo.py", "reinforce_from_scratch.py", "extension_grpo.py"], ids=lambda s: s.removesuffix(".py")
)
def test_examples_smoke(script: str, reference_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each plug-in example runs end to end (a few steps on the reference pipeline) and does what it says."""
    import json

    _isolate_algorithm_registry(monkeypatch)
    argv = ["--smoke", "--model", str(reference_pipeline), "--reward", "jpeg_compressibility", "--out", str(tmp_path)]
    run_example(ROOT / "examples" / script, argv, monkeypatch)
    result = json.loads((tmp_path / "result.json").read_text())
    # The --reward flag reached the environment: JPEG compressibility is minus a file size, always < 0.
    assert result["eval_before"] < 0 and result["eval_after"] < 0, result
    if script == "sb3_ppo.py":  # SB3's PPO really ran its update on the LoRA
        metrics = result["sb3_train_metrics"]
        assert metrics["train/n_updates"] > 0 and np.isfinite(metrics["train/policy_gradient_loss"]), metrics
        assert 0.0 <= metrics["train/clip_fraction"] <= 1.0
    if script == "reinforce_from_scratch.py":  # one training reward per epoch, two held-out samples per batch
        assert len(result["train_reward"]) == result["args"]["epochs"] and result["eval_samples"] == 2
    if script == "extension_grpo.py":
        state = torch.load(tmp_path / "grpo" / "checkpoints" / "last.pt", weights_only=False)
        history = state["history"][-1]
        assert history["kl_ref"] >= 0 and 0.0 <= history["clipfrac"] <= 1.0, history
        # peft's LoRA starts with B = 0: a non-zero B is a trained adapter.
        lora_b = [v for n, v in state["trainable"].items() if "lora_B" in n]
        assert lora_b and any(bool(v.abs().sum() > 0) for v in lora_b)
    assert (tmp_path / ("grpo/images/after.png" if script == "extension_grpo.py" else "before_after.png")).is_file()


def _isolate_algorithm_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let an example register its algorithm into copies of the registries that the test's teardown drops."""
    import importlib

    config_module = importlib.import_module("diffusion_mdp.agents.config")
    train_module = importlib.import_module("diffusion_mdp.agents.train")  # the package's `train` is the function

    monkeypatch.setattr(train_module, "AGENTS", dict(train_module.AGENTS))
    monkeypatch.setattr(config_module, "ALGORITHMS", config_module.ALGORITHMS)


def test_grpo_extension_honours_gradient_accumulation(
    reference_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example is a loss in the shared update loop: G = 2 minibatches make one AdamW step, not two."""
    from diffusion_mdp.agents import make_agent
    from diffusion_mdp.agents.config import build_config

    _isolate_algorithm_registry(monkeypatch)
    runpy.run_path(str(ROOT / "examples" / "extension_grpo.py"), run_name="extension_grpo")  # registers "grpo"
    steps = {}
    for accumulation in (1, 2):
        config = build_config(
            preset="tiny-shapes",
            algorithm="grpo", advantage_mode="group", group_size=2, use_lora=True, kl_coef=0.01,
            model=str(reference_pipeline), reward="jpeg_compressibility", name=f"g{accumulation}",
            output_dir=str(tmp_path), num_epochs=1, num_steps=2, num_inner_epochs=1, samples_per_epoch=4,
            sample_batch_size=4, train_batch_size=2, gradient_accumulation_steps=accumulation,
            eval_num_samples=0, image_every=0, progress_bar=False, log_formats="csv", num_threads=1,
        )  # fmt: skip
        agent = make_agent(config)
        agent.learn()
        steps[accumulation] = agent.global_step
        assert np.isfinite(agent.history[0]["loss"]) and agent.history[0]["kl_ref"] >= 0
    assert steps == {1: 2, 2: 1}  # 2 minibatches of 2 trajectories
