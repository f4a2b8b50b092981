"""Flow-GRPO: the loss's gradient at θ_old is REINFORCE with group advantages; the SDE window; training runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_mdp.agents import ConfigError, FlowGRPO, TrainConfig, flow_grpo_loss, make_agent, train
from diffusion_mdp.testing import build_reference_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reference_tiny_pipeline(tmp_path_factory.mktemp("micro"), size="micro")


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusion_mdp.testing import build_reference_tiny_sd3_pipeline

    return build_reference_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"))


def config(model: str | Path, out: Path, **changes: object) -> TrainConfig:
    values: dict[str, object] = dict(
        name="fg",
        output_dir=str(out),
        model=str(model),
        prompts="",
        algorithm="flow_grpo",
        advantage_mode="group",
        group_size=2,
        reward="jpeg_compressibility",
        num_steps=3,
        num_epochs=1,
        samples_per_epoch=4,
        sample_batch_size=4,
        train_batch_size=4,
        learning_rate=1e-2,
        clip_range=0.2,
        kl_coef=0.1,
        eval_num_samples=0,
        image_every=0,
        progress_bar=False,
        log_formats="csv",
    )
    values.update(changes)
    return TrainConfig.from_dict(values)


def test_gradient_at_theta_old_is_reinforce_with_group_advantages(micro: Path, tmp_path: Path) -> None:
    """At θ = θ_old = θ_ref (a fresh LoRA adds 0) every ratio is 1, inside the clip, and the KL and its
    gradient vanish, so ∇L = -mean_b A_b ∇ log π_θ(a_b | s_b) with A_b = (r_b - group mean) / (group std + 1e-6).
    """
    agent = make_agent(config(micro, tmp_path))
    agent.collect_rollouts(0)
    buffer = agent.buffer
    buffer.compute_returns_and_advantage(agent.normalizer, agent.config.adv_clip_max)
    # Group advantages by hand: the k = 2 samples of each prompt form a group.
    rewards, groups = buffer.episode_rewards.numpy(), buffer.group_ids
    assert groups[0] == groups[1] != groups[2] == groups[3]
    expected = np.empty(4)
    for g in np.unique(groups):
        members = groups == g
        expected[members] = (rewards[members] - rewards[members].mean()) / (rewards[members].std() + 1e-6)
    np.testing.assert_allclose(buffer.advantages[:, 1].numpy(), expected.clip(-5, 5), rtol=1e-5, atol=1e-6)

    step = next(iter(buffer.get(4, 1.0, torch.Generator().manual_seed(0)))).step(1)
    log_prob, out = agent.step_log_prob(step)
    kl = agent.kl_to_reference(step, out)
    loss, stats = flow_grpo_loss(log_prob, step.old_log_probs, step.advantages, 0.2, kl, kl_coef=0.1)
    assert float(stats["ratio"]) == pytest.approx(1.0, abs=1e-5) and float(stats["kl"]) == pytest.approx(0, abs=1e-12)
    ours = torch.autograd.grad(loss, agent.trainable, allow_unused=True)
    log_prob, _ = agent.step_log_prob(step)
    reinforce = -(torch.as_tensor(expected.clip(-5, 5), dtype=log_prob.dtype)[step.indices] * log_prob).mean()
    reference = torch.autograd.grad(reinforce, agent.trainable, allow_unused=True)
    def flatten(grads: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        pairs = zip(grads, agent.trainable, strict=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in pairs])

    flat = [flatten(ours), flatten(reference)]
    assert flat[1].abs().max() > 1e-8  # a real gradient, not two zeros
    torch.testing.assert_close(flat[0], flat[1], rtol=1e-4, atol=1e-4 * float(flat[1].abs().max()))


def test_needs_group_advantages(micro: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="advantage_mode='group'"):
        make_agent(config(micro, tmp_path, advantage_mode="batch"))
    with pytest.raises(ConfigError, match="sde_window_size"):
        config(micro, tmp_path, sde_window_size=4).validate()


def test_sde_window_on_a_flow_model(sd3_folder: Path, tmp_path: Path) -> None:
    agent = make_agent(config(sd3_folder, tmp_path, eta=0.7, guidance_scale=3.0, sde_window_size=1))
    assert isinstance(agent, FlowGRPO)
    windows = {agent.window_for_epoch(e) for e in range(20)}
    assert windows == {(0, 1), (1, 2), (2, 3)}  # start uniform in 0..T - K
    stats = agent.collect_rollouts(0)
    start, stop = agent.window
    log_probs = agent.buffer.log_probs
    outside = [k for k in range(3) if not start <= k < stop]
    assert not log_probs[:, outside].any() and log_probs[:, start:stop].ne(0).all()  # ODE outside: no density
    assert stats["window_start"] == start
    before = {n: p.detach().clone() for n, p in agent.unet.named_parameters() if p.requires_grad}
    metrics = agent.train_on_rollouts(0)
    assert metrics["first_ratio"] == pytest.approx(1.0, abs=1e-5) and np.isfinite(metrics["loss"])
    assert any(not torch.equal(p, before[n]) for n, p in agent.unet.named_parameters() if p.requires_grad)


def test_training_run_on_the_bundled_model(tmp_path: Path) -> None:
    cfg = config("tiny-shapes", tmp_path, num_steps=2, eval_num_samples=2, eval_every=1, sde_window_size=1)
    agent, summary = train(cfg)
    assert agent.history[0]["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(summary["eval_after"]) and (tmp_path / "fg" / "lora").is_dir()
