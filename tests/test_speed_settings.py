"""Speed settings keep the algorithm's numbers: merged-LoRA sampling, and the benchmarks' plain DDPO baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusion_mdp.agents import TrainConfig, make_agent
from diffusion_mdp.testing import build_reference_tiny_pipeline

from .conftest import import_benchmark


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reference_tiny_pipeline(tmp_path_factory.mktemp("micro"), size="micro")


def _config(micro: Path, out: Path, **changes: object) -> TrainConfig:
    return TrainConfig(
        name="t",
        output_dir=str(out),
        model=str(micro),
        prompts="imagenet_animals",
        num_steps=3,
        num_epochs=1,
        samples_per_epoch=4,
        sample_batch_size=2,
        train_batch_size=2,
        stat_min_count=2,
        eval_num_samples=0,
        image_every=0,
        progress_bar=False,
        log_formats="csv",
        learning_rate=1e-2,
        **changes,
    )


def test_merged_lora_sampling_matches_and_restores_the_base_weights(micro: Path, tmp_path: Path) -> None:
    plain = make_agent(_config(micro, tmp_path / "a"))
    merged = make_agent(_config(micro, tmp_path / "b", merge_lora_for_sampling=True))
    # Give the adapters non-zero B so that merging changes the weights (peft initialises B = 0).
    for agent in (plain, merged):
        torch.manual_seed(1)
        for name, param in agent.unet.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)
    base_before = {n: p.detach().clone() for n, p in merged.unet.named_parameters() if "base_layer" in n}
    plain.collect_rollouts(0)
    merged.collect_rollouts(0)
    torch.testing.assert_close(merged.buffer.latents, plain.buffer.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged.buffer.log_probs, plain.buffer.log_probs, rtol=1e-5, atol=1e-5)
    for name, param in merged.unet.named_parameters():
        if "base_layer" in name:
            assert torch.equal(param, base_before[name]), f"{name} was not restored exactly"
    layers = [m for m in merged.unet.modules() if hasattr(m, "merged_adapters")]
    assert layers and not any(m.merged for m in layers)
    metrics = merged.train_on_rollouts(0)
    assert abs(metrics["first_ratio"] - 1.0) < 1e-3


def test_plain_ddpo_baseline_scores_its_own_samples_and_learns(micro: Path) -> None:
    plain_ddpo = import_benchmark("plain_ddpo")
    PlainConfig, PlainDDPO = plain_ddpo.PlainConfig, plain_ddpo.PlainDDPO
    cfg = PlainConfig(num_steps=3, samples_per_epoch=4, sample_batch_size=2, train_batch_size=2, learning_rate=1e-2)
    plain = PlainDDPO(micro, ["a red circle", "two blue squares"], cfg)
    before = [p.detach().clone() for p in plain.trainable]
    result = plain.run_epoch(0)
    assert abs(result["first_ratio"] - 1.0) < 1e-5
    assert result["sampling_s"] > 0 and result["training_s"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, plain.trainable, strict=True))
