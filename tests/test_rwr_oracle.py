"""benchmarks/rwr_oracle.py: its premise (the renders it trains on are right by the judge, for their prompts)
and a smoke run (1 step of 4 renders, 1 image per prompt) through fine-tuning, checkpoint and measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import import_benchmark

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def oracle():
    return import_benchmark("rwr_oracle")


def test_renders_are_right_for_their_prompts(oracle) -> None:
    from diffusion_mdp.prompts import load_prompts
    from diffusion_mdp.rewards.shapes_geneval import judge_images

    prompt_set = load_prompts("shapes_four_rl_train")
    images, prompts = oracle.renders(prompt_set, 24, np.random.default_rng(0))
    assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8
    metadata = [prompt_set.metadata[prompt_set.prompts.index(p)] for p in prompts]
    assert judge_images(images, metadata)["correct"].all()
    shuffled = metadata[1:] + metadata[:1]  # the same images judged against other prompts: not all right
    assert not judge_images(images, shuffled)["correct"].all()


def test_smoke_run_fine_tunes_and_measures(oracle, tmp_path: Path) -> None:
    results = oracle.main(["--lrs", "1e-3", "--steps", "1", "--batch", "4", "--draws", "2", "--per-prompt", "1",
                           "--threads", "1", "--out", str(tmp_path)])  # fmt: skip
    written = json.loads((tmp_path / "results.json").read_text())
    run = written["lr 0.001, caption dropout 0"]
    assert set(run["after"]) == set(written["base"]) and run["training"]["loss_first10"] > 0
    state = torch.load(tmp_path / "lr0.001-dropout0.pt", weights_only=False)["trainable"]
    from diffusers import UNet2DConditionModel

    from diffusion_mdp.shapes import model_path

    base = UNet2DConditionModel.from_pretrained(Path(model_path()) / "unet").state_dict()
    assert state.keys() == base.keys()
    assert any(not torch.equal(state[k], base[k]) for k in base)  # one step at lr 1e-3 moved the weights
    assert results["base"] == written["base"]
