"""Tests of the DDPO agents: advantages, PPO loss, stat tracking, smoke runs, exact resume, LoRA export, errors.

Everything runs on a *micro* pipeline (the reference tiny pipeline's structure at 16×16 pixels, latents
4×8×8) with 3 denoising steps, so that the whole file takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import diffusion_mdp.rewards as rewards_module
from diffusion_mdp.agents import (
    AdvantageNormalizer,
    ConfigError,
    DenoisingRolloutBuffer,
    PerPromptStatTracker,
    StepBatch,
    TrainConfig,
    TrajectoryMinibatch,
    group_statistics,
    make_agent,
    ppo_clip_loss,
    resume_config,
    rwr_weights,
    sparse_rwr_weights,
    train,
)
from diffusion_mdp.agents.update import run_update
from diffusion_mdp.ddim import DDIMSchedule
from diffusion_mdp.mdp import RewardError
from diffusion_mdp.rewards import register_reward
from diffusion_mdp.testing import build_reference_tiny_pipeline


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reference_tiny_pipeline(tmp_path_factory.mktemp("micro"), size="micro")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\ntwo blue squares\nthree green triangles\n")
    return path


def tiny_config(micro: Path, prompt_file: Path, out: Path, **changes: object) -> TrainConfig:
    values: dict[str, object] = dict(
        name="t",
        output_dir=str(out),
        model=str(micro),
        prompts=str(prompt_file),
        reward="jpeg_compressibility",
        num_steps=3,
        num_epochs=2,
        samples_per_epoch=4,
        sample_batch_size=2,
        train_batch_size=2,
        stat_min_count=2,
        learning_rate=1e-2,  # large, so that two epochs visibly move the weights
        clip_range=0.2,
        eval_num_samples=2,
        eval_every=1,
        save_every=1,
        image_every=1,
        progress_bar=False,
        log_formats="csv",
    )
    values.update(changes)
    return TrainConfig.from_dict(values)


# ------------------------------------------------------------------------------------------------
# Advantages and losses on hand-made numbers
# ------------------------------------------------------------------------------------------------
def _filled_buffer(rewards: np.ndarray, num_steps: int = 4, gamma: float = 1.0) -> DenoisingRolloutBuffer:
    n = len(rewards)
    buffer = DenoisingRolloutBuffer(num_steps, n, (1, 2, 2), (3, 5), gamma=gamma)
    prompts = tuple(f"p{i % 2}" for i in range(n))
    obs = {
        "latent": torch.zeros(n, 1, 2, 2),
        "prompt_id": torch.arange(n),
        "prompt_embeds": torch.zeros(n, 3, 5),
        "prompt": prompts,
    }
    for k in range(num_steps):
        obs["timestep"] = torch.full((n,), 900 - 100 * k)
        step_reward = rewards if k == num_steps - 1 else np.zeros(n)
        buffer.add(obs, torch.full((n, 1, 2, 2), float(k)), step_reward, log_prob=torch.full((n,), -float(k)))
    return buffer


def test_every_step_advantage_is_the_normalised_terminal_reward() -> None:
    rewards = np.array([1.0, 4.0, -2.0, 0.5, 3.0])
    buffer = _filled_buffer(rewards)
    buffer.compute_returns_and_advantage(AdvantageNormalizer("batch"))
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    assert buffer.advantages.shape == (5, 4)
    for t in range(4):  # γ = λ = 1: the same advantage at every step
        np.testing.assert_allclose(buffer.advantages[:, t].numpy(), expected, rtol=1e-6)
    # The T + 1 latents are stored once: state k is latents[:, k], action k is latents[:, k + 1].
    assert torch.equal(buffer.latents[:, 1:, 0, 0, 0], torch.arange(4.0).expand(5, 4))


def test_discount_below_one_changes_earlier_steps() -> None:
    rewards = np.array([1.0, 2.0])
    buffer = _filled_buffer(rewards, gamma=0.5)
    buffer.compute_returns_and_advantage(lambda r, p, g: (np.zeros_like(r), np.ones_like(r)))
    np.testing.assert_allclose(buffer.returns[:, 0].numpy(), rewards * 0.5**3)
    np.testing.assert_allclose(buffer.returns[:, -1].numpy(), rewards)


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5])
def test_returns_equal_sb3_gae_without_a_critic(gamma: float) -> None:
    """SB3's GAE with V ≡ 0 and λ = 1 is the discounted return: the buffer's G_t must equal SB3's returns."""
    from gymnasium import spaces
    from stable_baselines3.common.buffers import RolloutBuffer

    rewards = np.array([1.0, 4.0, -2.0])
    ours = _filled_buffer(rewards, gamma=gamma)
    ours.compute_returns_and_advantage(lambda r, p, g: (np.zeros_like(r), np.ones_like(r)))
    box = spaces.Box(-1.0, 1.0, (1,), np.float32)
    sb3 = RolloutBuffer(4, box, box, "cpu", gae_lambda=1.0, gamma=gamma, n_envs=len(rewards))
    for k in range(4):  # SB3's layout: (buffer_size = T, n_envs = trajectories)
        step_reward = rewards if k == 3 else np.zeros(len(rewards))
        zeros = torch.zeros(len(rewards))
        sb3.add(np.zeros((3, 1)), np.zeros((3, 1)), step_reward, np.full(3, k == 0), zeros, zeros)
    sb3.compute_returns_and_advantage(last_values=torch.zeros(len(rewards)), dones=np.ones(len(rewards)))
    np.testing.assert_allclose(ours.returns.numpy(), sb3.returns.T, rtol=1e-6)
    assert ours.returns[0, 0] == pytest.approx(gamma**3)  # r = 1 three discounted steps before the end


def test_advantage_clipping_and_minibatches_cover_every_sample() -> None:
    rewards = np.array([0.0, 0.0, 0.0, 100.0])
    buffer = _filled_buffer(rewards)
    buffer.compute_returns_and_advantage(AdvantageNormalizer("batch"), adv_clip_max=1.5)
    assert float(buffer.advantages.max()) == pytest.approx(1.5)
    minibatches = list(buffer.get(2, timestep_fraction=0.5, generator=torch.Generator().manual_seed(0)))
    assert sorted(torch.cat([mb.indices for mb in minibatches]).tolist()) == [0, 1, 2, 3]
    step = minibatches[0].step(0)
    assert minibatches[0].num_timesteps == 2 and step.latents.shape == (2, 1, 2, 2)
    # x_{t-1} of step k is the stored latent k + 1, and its old log-prob is the one recorded at step k.
    assert torch.equal(step.next_latents[:, 0, 0, 0], step.step_indices.float())
    assert torch.equal(step.old_log_probs, -step.step_indices.float())


def test_ppo_clip_loss_on_hand_made_numbers() -> None:
    ratio = torch.tensor([0.5, 1.0, 1.5, 1.5])
    advantages = torch.tensor([1.0, 2.0, 1.0, -1.0])
    loss, stats = ppo_clip_loss(torch.log(ratio), torch.zeros(4), advantages, clip_range=0.2)
    # per sample max(-A r, -A clip(r)):  A=1,r=.5 -> max(-.5,-.8)=-.5; A=2,r=1 -> -2; A=1,r=1.5 -> max(-1.5,-1.2)=-1.2;
    # A=-1,r=1.5 -> max(1.5, 1.2) = 1.5   => mean = (-.5 - 2 - 1.2 + 1.5) / 4
    assert float(loss) == pytest.approx((-0.5 - 2.0 - 1.2 + 1.5) / 4)
    assert float(stats["clipfrac"]) == pytest.approx(0.75)
    assert float(stats["approx_kl"]) == pytest.approx(0.5 * float((torch.log(ratio) ** 2).mean()))
    # Gradient: zero where the clipped branch is active (sample 2), -A/4 · r elsewhere.
    log_probs = torch.log(ratio).requires_grad_(True)
    ppo_clip_loss(log_probs, torch.zeros(4), advantages, clip_range=0.2)[0].backward()
    np.testing.assert_allclose(log_probs.grad.numpy(), [-0.5 / 4, -2.0 / 4, 0.0, 1.5 / 4], rtol=1e-6)


def test_rwr_weights() -> None:
    rewards = torch.tensor([0.0, 1.0, 2.0])
    weights = rwr_weights(rewards, beta=1.0)
    expected = torch.softmax(rewards, 0) * 3
    torch.testing.assert_close(weights, expected)
    assert sparse_rwr_weights(torch.tensor([5.0, 1.0, 3.0, 2.0]), 0.75).tolist() == [4.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------
# Stat tracker
# ------------------------------------------------------------------------------------------------
def test_stat_tracker_per_prompt_min_count_and_state() -> None:
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    prompts = ["a", "a", "b"]
    out = tracker.update(prompts, np.array([1.0, 3.0, 10.0]))
    batch = np.array([1.0, 3.0, 10.0])
    # "a" has 2 rewards (>= min_count): its own statistics; "b" has 1: the batch's.
    np.testing.assert_allclose(out[:2], [-1.0, 1.0], rtol=1e-5)
    assert out[2] == pytest.approx((10.0 - batch.mean()) / (batch.std() + 1e-6))
    state = tracker.state_dict()
    clone = PerPromptStatTracker()
    clone.load_state_dict(state)
    nxt = (["a", "b"], np.array([5.0, 12.0]))
    np.testing.assert_array_equal(tracker.update(*nxt), clone.update(*nxt))
    # The window keeps the last 3 rewards of "a": [3, 5, 7].
    tracker.update(["a"], np.array([7.0]))
    assert list(tracker.stats["a"]) == [3.0, 5.0, 7.0]


def test_group_statistics() -> None:
    mean, std = group_statistics(np.array([0, 0, 1, 1]), np.array([1.0, 3.0, 10.0, 10.0]))
    np.testing.assert_allclose(mean, [2.0, 2.0, 10.0, 10.0])
    np.testing.assert_allclose(std, [1.0 + 1e-6, 1.0 + 1e-6, 1e-6, 1e-6])


# ------------------------------------------------------------------------------------------------
# Agents end to end
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["ddpo_is", "ddpo_sf", "rwr", "sparse_rwr"])
def test_two_epoch_smoke_run(algorithm: str, micro: Path, prompt_file: Path, tmp_path: Path) -> None:
    kl_coef = 0.0 if "rwr" in algorithm else 0.1  # RWR has no per-step Gaussian to anchor (refused)
    cfg = tiny_config(micro, prompt_file, tmp_path, algorithm=algorithm, num_inner_epochs=1, kl_coef=kl_coef)
    agent = make_agent(cfg)
    before = {n: p.detach().clone() for n, p in agent.unet.named_parameters() if p.requires_grad}
    assert before and all("lora" in n for n in before)  # LoRA by default: only adapter weights train
    summary = agent.learn()
    assert len(agent.history) == 2 and summary["epochs"] == 2
    for metrics in agent.history:
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    after = dict(agent.unet.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before), "no trainable weight changed"
    if algorithm == "ddpo_is":
        # The first minibatch is scored by the policy that sampled it: the ratio is 1.
        assert agent.history[0]["first_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert "kl_ref" in agent.history[1]
    run = tmp_path / "t"
    for name in ("reward_curve.png", "summary.json", "metrics.jsonl", "images/before.png", "images/after.png"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / "checkpoints" / "last.pt.tmp").exists()


def test_sde_window_in_ddpo_is_branches_and_trains_on_the_window_only(
    micro: Path, prompt_file: Path, tmp_path: Path
) -> None:
    """With an SDE window of the first 2 of 3 steps, step 3 is deterministic DDIM: its action is the η = 0
    mean of its state (no density: log-prob marker 0), and the update trains on steps 1 and 2 only."""
    cfg = tiny_config(micro, prompt_file, tmp_path, num_epochs=1, sde_window_size=2, sde_window_max_start=0)
    agent = make_agent(cfg)
    stats = agent.collect_rollouts(0)
    assert stats["window_start"] == 0 and agent.trained_steps(0) == (0, 2)
    buffer = agent.buffer
    assert buffer.log_probs[:, :2].ne(0).all() and not buffer.log_probs[:, 2].any()
    x, t = buffer.latents[:, 2], buffer.timesteps[:, 2]
    with torch.no_grad():
        output = agent.policy.predict(x, t, buffer.prompt_embeds)
    expected = DDIMSchedule.from_scheduler(agent.components.scheduler, 3, eta=0.0).mean(output, t, x)
    torch.testing.assert_close(buffer.latents[:, 3], expected, rtol=1e-5, atol=1e-5)
    before = {n: p.detach().clone() for n, p in agent.unet.named_parameters() if p.requires_grad}
    metrics = agent.train_on_rollouts(0)
    assert metrics["first_ratio"] == pytest.approx(1.0, abs=1e-5) and np.isfinite(metrics["loss"])
    assert any(not torch.equal(p, before[n]) for n, p in agent.unet.named_parameters() if p.requires_grad)


def test_kl_anchor_in_full_fine_tuning_is_the_frozen_pre_trained_unet(
    micro: Path, prompt_file: Path, tmp_path: Path
) -> None:
    """Without LoRA, π_ref is a frozen copy of the UNet: KL 0 before any update, > 0 after, the copy unchanged."""
    cfg = tiny_config(micro, prompt_file, tmp_path, algorithm="ddpo_is", num_epochs=1, use_lora=False, kl_coef=0.1,
                      eval_num_samples=0, image_every=0)  # fmt: skip
    agent = make_agent(cfg)
    assert agent.reference_unet is not None and agent.reference_unet is not agent.unet
    reference = {n: p.detach().clone() for n, p in agent.reference_unet.named_parameters()}
    assert not any(p.requires_grad for p in agent.reference_unet.parameters())

    def kl_now() -> float:  # on a fresh batch of the current policy's samples, at their first step
        agent.collect_rollouts(0)
        agent.prepare_update(0)
        batch = next(agent.buffer.get(2)).step(0)
        with torch.no_grad():
            _, out = agent.step_log_prob(batch)
            return float(agent.kl_to_reference(batch, out).max())

    assert kl_now() == 0.0  # θ = θ_ref: the two Gaussians are the same
    agent.learn()
    assert kl_now() > 0.0
    assert agent.policy.unet is agent.unet  # the policy is back on the trained UNet after each KL term
    for name, param in agent.reference_unet.named_parameters():
        torch.testing.assert_close(param, reference[name], rtol=0, atol=0)
    assert any(not torch.equal(p, reference[n]) for n, p in agent.unet.named_parameters())


def test_rwr_reencode_regresses_the_vae_encoding_of_the_samples_images(
    micro: Path, prompt_file: Path, tmp_path: Path
) -> None:
    """``rwr_reencode``: the regressed x_0 is encode(decode(x_0)), not the sampler's latent itself."""
    from diffusion_mdp.mdp import decode_latents, encode_images

    for reencode in (False, True):
        cfg = tiny_config(micro, prompt_file, tmp_path / str(reencode), algorithm="sparse_rwr", num_epochs=1,
                          rwr_reencode=reencode, eval_num_samples=0, image_every=0)  # fmt: skip
        agent = make_agent(cfg)
        agent.collect_rollouts(0)
        agent.prepare_update(0)
        sampled = agent.buffer.final_latents
        if not reencode:
            assert torch.equal(agent.targets, sampled)
            continue
        vae = agent.components.vae
        torch.testing.assert_close(agent.targets, encode_images(vae, decode_latents(vae, sampled)))
        assert agent.targets.shape == sampled.shape and not torch.allclose(agent.targets, sampled, atol=1e-3)


@pytest.mark.parametrize("guided", [True, False])
def test_rwr_regresses_the_guided_or_the_conditional_prediction(
    guided: bool, micro: Path, prompt_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rwr_guided_loss`` picks ε̃ (w = 5, as sampled) or ε_c (w = 1) as the regressed prediction."""
    cfg = tiny_config(micro, prompt_file, tmp_path, algorithm="rwr", num_epochs=1, rwr_guided_loss=guided,
                      eval_num_samples=0, image_every=0)  # fmt: skip
    agent = make_agent(cfg)
    real_predict, calls = agent.policy.predict, []

    def spy(latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, guidance_scale=None):
        calls.append((torch.is_grad_enabled(), guidance_scale))
        return real_predict(latents, timesteps, embeds, guidance_scale=guidance_scale)

    monkeypatch.setattr(agent.policy, "predict", spy)
    agent.learn()
    training_calls = {scale for with_grad, scale in calls if with_grad}
    assert training_calls == ({None} if guided else {1.0})
    # And w = 1 really is the conditional branch alone, which differs from the guided output.
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 500])
    embeds = agent.buffer.prompt_embeds[:2]
    with torch.no_grad():
        conditional = real_predict(x, t, embeds, guidance_scale=1.0)
        torch.testing.assert_close(conditional, agent.policy._unet(x, t, embeds))
        assert not torch.allclose(conditional, real_predict(x, t, embeds))


def test_ddpo_sf_step_equals_ddpo_is_step_when_is_takes_one_update(
    micro: Path, prompt_file: Path, tmp_path: Path
) -> None:
    """DDPO-IS with one update per epoch (all samples in one accumulated step) is DDPO-SF.

    At θ = θ_old every ratio is 1, inside the clip, so ∇ max(-A r, -A clip(r)) = -A ∇ log π: the same
    gradient as REINFORCE, with the same mean over samples and timesteps. Same seed, same rollouts: the
    gradient of the first (only) update must agree. It is read from AdamW's first moment after the step,
    m_1 = (1 - β_1) g (the weights alone would not do: Adam's first step is ±lr whatever the gradient's
    scale), with gradient clipping off so that g is the raw gradient. A sign or scale slip in either loss
    fails it.
    """
    common = dict(use_lora=False, num_epochs=1, train_batch_size=2, gradient_accumulation_steps=2,
                  max_grad_norm=0.0, eval_num_samples=0, image_every=0)  # fmt: skip
    gradients = {}
    for algorithm in ("ddpo_sf", "ddpo_is"):
        agent = make_agent(tiny_config(micro, prompt_file, tmp_path / algorithm, algorithm=algorithm, **common))
        agent.learn()
        state = agent.optimizer.state
        gradients[algorithm] = torch.cat([state[p]["exp_avg"].flatten() for p in agent.trainable])
    sf, is_ = gradients["ddpo_sf"], gradients["ddpo_is"]
    assert sf.abs().max() > 1e-7  # a real gradient, not two zeros
    torch.testing.assert_close(is_, sf, rtol=1e-3, atol=1e-3 * float(sf.abs().max()))


@pytest.mark.parametrize("algorithm", ["ddpo_is", "ddpo_sf"])
def test_stacking_timesteps_into_one_forward_leaves_the_gradient_unchanged(
    micro: Path, prompt_file: Path, tmp_path: Path, algorithm: str
) -> None:
    """``timesteps_per_forward`` = c runs c of each trajectory's steps as one forward of b·c rows.

    Same rollouts, same weights, gradient accumulated without an optimizer step: with c = 2 of K = 3 steps
    (chunks of 2 and 1, so the uneven last chunk's 1/(K·G) weighting is exercised too) the gradient and every
    logged mean equal c = 1's up to float rounding (DDPO-SF: over G = 2 accumulated minibatches), and DDPO-IS's
    first ratio is still 1.
    """
    agents = {}
    for per_forward in (1, 2):
        cfg = tiny_config(micro, prompt_file, tmp_path / str(per_forward), algorithm=algorithm, use_lora=False,
                          timesteps_per_forward=per_forward, eval_num_samples=0, image_every=0)  # fmt: skip
        agent = make_agent(cfg)
        agent.collect_rollouts(0)
        metrics = run_update(agent, 0, step_optimizer=False)
        agents[per_forward] = (agent, metrics)
    (one, m1), (two, m2) = agents[1], agents[2]
    torch.testing.assert_close(two.buffer.latents, one.buffer.latents)  # the same rollouts
    g1 = torch.cat([p.grad.flatten() for p in one.trainable])
    g2 = torch.cat([p.grad.flatten() for p in two.trainable])
    assert g1.abs().max() > 1e-7
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6 * float(g1.abs().max()))
    assert m2.keys() == m1.keys()
    for name in m1:
        assert m2[name] == pytest.approx(m1[name], rel=1e-4, abs=1e-7), name
    if algorithm == "ddpo_is":
        assert m2["first_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_stacked_steps_are_step_major() -> None:
    """``steps(j, j + c)`` is ``step(j)``, …, ``step(j + c - 1)`` concatenated, in that order."""
    buffer = _filled_buffer(np.array([1.0, 2.0, 3.0]), num_steps=4)
    buffer.latents = torch.randn_like(buffer.latents)  # every (trajectory, step) distinct
    buffer.prompt_embeds = torch.randn_like(buffer.prompt_embeds)
    minibatch = TrajectoryMinibatch(buffer, torch.tensor([2, 0]), torch.tensor([[3, 1, 0, 2], [0, 2, 3, 1]]))
    stacked = minibatch.steps(1, 3)
    for field in StepBatch._fields:
        expected = torch.cat([getattr(minibatch.step(1), field), getattr(minibatch.step(2), field)])
        assert torch.equal(getattr(stacked, field), expected), field
    assert stacked.step_indices.tolist() == [1, 2, 0, 3]


def test_full_finetuning_and_group_advantages(micro: Path, prompt_file: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        micro,
        prompt_file,
        tmp_path,
        use_lora=False,
        advantage_mode="group",
        group_size=2,
        num_epochs=1,
        eval_num_samples=0,
        image_every=0,
    )
    agent = make_agent(cfg)
    n_trainable = sum(p.numel() for p in agent.trainable)
    assert n_trainable == sum(p.numel() for p in agent.unet.parameters())
    agent.collect_rollouts(0)
    prompts = agent.buffer.prompts
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3]  # k = 2 samples per prompt per batch
    agent.buffer.compute_returns_and_advantage(agent.normalizer)
    adv = agent.buffer.advantages[:, 0]
    assert float(adv[0] + adv[1]) == pytest.approx(0.0, abs=1e-4)  # each group is centred on its own mean


def test_resume_equals_uninterrupted(micro: Path, prompt_file: Path, tmp_path: Path) -> None:
    changes = dict(
        num_inner_epochs=2,
        timestep_fraction=0.67,
        lr_schedule="linear",
        lr_warmup_steps=10,  # still warming up when the run is interrupted
        eval_every=2,
        image_every=0,
    )
    straight, _ = train(tiny_config(micro, prompt_file, tmp_path / "a", num_epochs=3, **changes))

    # The same run, "interrupted" during epoch 2 the way Ctrl-C does it: the epoch finishes, a checkpoint is
    # written, KeyboardInterrupt propagates. Then a fresh agent resumes from the checkpoint.
    interrupted = make_agent(tiny_config(micro, prompt_file, tmp_path / "b", num_epochs=3, **changes))
    original = interrupted.train_on_rollouts

    def train_then_stop(epoch: int) -> dict[str, float]:
        if epoch == 1:
            interrupted.request_stop()
        return original(epoch)

    interrupted.train_on_rollouts = train_then_stop  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        interrupted.learn()
    assert torch.load(tmp_path / "b" / "t" / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 2
    with pytest.raises(ConfigError, match="differ"):
        resume_config(tmp_path / "b" / "t", {"learning_rate": 0.5})
    resumed, _ = train(resume_config(tmp_path / "b" / "t"), resume=True)
    assert len(resumed.history) == 3
    assert resumed.history == straight.history  # every per-epoch metric, bit for bit
    assert [e["eval_reward_mean"] for e in resumed.eval_history] == [
        e["eval_reward_mean"] for e in straight.eval_history
    ]
    for (name, p), q in zip(straight.unet.named_parameters(), resumed.unet.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_lr_warmup_rises_linearly_then_follows_the_schedule(micro: Path, prompt_file: Path, tmp_path: Path) -> None:
    agent = make_agent(tiny_config(micro, prompt_file, tmp_path, lr_warmup_steps=3, lr_schedule="linear", lr_end=0.0))
    seen: list[float] = []
    step = agent.optimizer.step

    def record_lr(*args: object, **kwargs: object) -> object:
        seen.append(agent.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    agent.optimizer.step = record_lr  # type: ignore[method-assign]
    agent.learn()
    per_epoch = len(seen) // 2
    assert per_epoch >= 2, "the test needs two optimizer steps per epoch"
    # Epoch 1 runs at lr = 1e-2, epoch 2 at 5e-3 (linear to 0 over 2 epochs); steps 1-3 are scaled by 1/3, 2/3, 1.
    expected = [1e-2 * min(1.0, (k + 1) / 3) * (1.0 if k < per_epoch else 0.5) for k in range(len(seen))]
    assert seen == pytest.approx(expected)
    assert [m["lr"] for m in agent.history] == pytest.approx([seen[per_epoch - 1], seen[-1]])  # what the log says


def test_lora_export_round_trip(micro: Path, prompt_file: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    agent, _ = train(tiny_config(micro, prompt_file, tmp_path, num_epochs=1, eval_num_samples=0))
    pipe = StableDiffusionPipeline.from_pretrained(micro, safety_checker=None)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 500])
    embeds = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=embeds).sample
        pipe.load_lora_weights(tmp_path / "t" / "lora")
        loaded = pipe.unet(x, t, encoder_hidden_states=embeds).sample
        trained = agent.unet(x, t, encoder_hidden_states=embeds).sample
    assert not torch.allclose(base, trained, atol=1e-6), "training did not change the UNet's output"
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)


def test_full_finetuning_exports_the_unet(micro: Path, prompt_file: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    agent, _ = train(tiny_config(micro, prompt_file, tmp_path, num_epochs=1, eval_num_samples=0, use_lora=False))
    base = UNet2DConditionModel.from_pretrained(micro, subfolder="unet")
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "t" / "unet")
    trained = dict(agent.unet.named_parameters())
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, trained[n])]
    assert changed, "training did not change any UNet weight"
    for name, param in exported.named_parameters():
        assert torch.equal(param, trained[name]), name


# ------------------------------------------------------------------------------------------------
# Failures
# ------------------------------------------------------------------------------------------------
def test_bad_configs_fail_before_any_work(micro: Path, prompt_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of sample_batch_size"):
        tiny_config(micro, prompt_file, tmp_path, samples_per_epoch=5).validate()
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        TrainConfig.from_dict({"learning_rte": 1e-3})
    with pytest.raises(ConfigError, match="not registered; available"):
        tiny_config(micro, prompt_file, tmp_path, reward="no_such_reward").validate()
    with pytest.raises(ConfigError, match="num_inner_epochs=1"):
        tiny_config(micro, prompt_file, tmp_path, algorithm="ddpo_sf", num_inner_epochs=2).validate()
    with pytest.raises(ConfigError, match="learning_rate must be a float"):
        TrainConfig.from_dict({"learning_rate": "fast"})
    with pytest.raises(ConfigError, match="does not exist"):
        tiny_config(micro, prompt_file, tmp_path, model=str(tmp_path / "missing")).validate()
    with pytest.raises(ConfigError):
        train(tiny_config(micro, prompt_file, tmp_path, clip_range=-1.0))
    assert not (tmp_path / "t").exists(), "a bad config must fail before creating the run folder"
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(tiny_config(micro, prompt_file, tmp_path), resume=True)


@pytest.fixture
def scaled_brightness_reward(monkeypatch: pytest.MonkeyPatch) -> str:
    """A reward with a factory argument, registered for this test only: ``scale`` × mean brightness."""

    def factory(scale: float = 1.0):
        def reward(images, prompts, metadata):
            return scale * images.reshape(len(images), -1).mean(axis=1).astype(np.float64) / 255.0, {}

        return reward

    name = "_test_scaled_brightness"
    rewards_module.available_rewards()  # the built-in rewards first, so that the copy holds them
    monkeypatch.setattr(rewards_module, "_REGISTRY", dict(rewards_module._REGISTRY))
    register_reward(name)(factory)
    return name


def test_reward_kwargs_reach_the_factory(
    scaled_brightness_reward: str, micro: Path, prompt_file: Path, tmp_path: Path
) -> None:
    images = np.full((2, 4, 4, 3), 51, dtype=np.uint8)  # brightness 0.2
    for given, scale in (('{"scale": -3.0}', -3.0), ({"scale": 2.0}, 2.0), ("", 1.0)):  # flag text, file table, none
        cfg = tiny_config(micro, prompt_file, tmp_path, reward=scaled_brightness_reward, reward_kwargs=given)
        agent = make_agent(cfg.validate())
        rewards, _ = agent.mdp.reward_fn(images, ["a", "b"], [{}, {}])
        np.testing.assert_allclose(rewards, [0.2 * scale] * 2)


def test_bad_reward_kwargs_fail_before_any_work(
    scaled_brightness_reward: str, micro: Path, prompt_file: Path, tmp_path: Path
) -> None:
    def config(reward_kwargs: object, reward: str = scaled_brightness_reward) -> TrainConfig:
        return tiny_config(micro, prompt_file, tmp_path, reward=reward, reward_kwargs=reward_kwargs)

    with pytest.raises(ConfigError, match=r"do not fit the factory .* it takes: scale"):
        config('{"sclae": 2}').validate()
    with pytest.raises(ConfigError, match="reward_kwargs is not JSON"):
        config("scale=2").validate()
    with pytest.raises(ConfigError, match="must be a JSON object"):
        config("[2]").validate()
    with pytest.raises(ConfigError, match="reward server takes"):
        config('{"scale": 2}', reward="http://localhost:8000").validate()
    with pytest.raises(ConfigError, match="reward_kwargs must be a str"):
        config(2.0)
    with pytest.raises(ConfigError, match="it takes: attribute_weight"):
        config('{"weight": 0.5}', reward="shapes_geneval_graded").validate()
    with pytest.raises(ConfigError, match="attribute_weight must be >= 0"):  # refused by the factory itself
        make_agent(config('{"attribute_weight": -1}', reward="shapes_geneval_graded").validate())
    assert not (tmp_path / "t").exists(), "a bad config must fail before creating the run folder"


@pytest.fixture
def nan_on_third_batch_reward(monkeypatch: pytest.MonkeyPatch) -> str:
    """A reward registered for this test only (the registry is restored afterwards): NaN from the 3rd call."""
    calls = {"n": 0}

    def factory():
        def reward(images, prompts, metadata):
            calls["n"] += 1
            values = -images.reshape(len(images), -1).mean(axis=1).astype(np.float64)
            if calls["n"] >= 3:  # epoch 1 has 2 sample batches; the first batch of epoch 2 returns NaN
                values[0] = np.nan
            return values, {}

        return reward

    name = "_test_nan_on_third_batch"
    monkeypatch.setattr(rewards_module, "_REGISTRY", dict(rewards_module._REGISTRY))
    register_reward(name)(factory)
    return name


@pytest.mark.usefixtures("nan_on_third_batch_reward")
def test_reward_error_keeps_the_last_checkpoint(micro: Path, prompt_file: Path, tmp_path: Path) -> None:
    cfg = tiny_config(micro, prompt_file, tmp_path, reward="_test_nan_on_third_batch", num_epochs=3, eval_num_samples=0)
    with pytest.raises(RewardError, match=r"_test_nan_on_third_batch.*NaN") as info:
        train(cfg)
    assert "epoch 2, sample batch 1/2" in str(info.value) and "intact" in str(info.value)
    state = torch.load(tmp_path / "t" / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    # The failing epoch's samples are kept: x_0 latents and prompts of the batch whose reward failed.
    kept = torch.load(tmp_path / "t" / "failed_rewards" / "epoch2.pt", weights_only=False)
    assert "failed_rewards" in str(info.value)
    assert kept["latents"].shape[0] == len(kept["prompts"]) == cfg.sample_batch_size
    assert torch.isfinite(kept["latents"]).all() and kept["batch"] == 0
