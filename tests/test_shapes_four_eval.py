"""benchmarks/shapes_four_eval.py: runs are measured on the base model's noise (a run holding the base weights
gains exactly 0), several runs give per-run gains with a t interval, and bad arguments stop before any work.
"""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch

from .conftest import import_benchmark

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def evaluation():
    return import_benchmark("shapes_four_eval")


def fake_run(folder: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A run folder as `diffusion-mdp train` leaves it, as far as the evaluation reads it."""
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"trainable": weights, "epoch": 3}, folder / "checkpoints" / "last.pt")
    return folder


def test_examples(evaluation) -> None:
    result = doctest.testmod(evaluation, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_gains_are_paired_on_the_base_models_noise(evaluation, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from diffusion_mdp.shapes import model_path

    base = UNet2DConditionModel.from_pretrained(Path(model_path()) / "unet").state_dict()
    # ε ≡ 0: the sampler returns blurred noise, which the judge never finds right.
    silenced = {k: torch.zeros_like(v) if k.startswith("conv_out") else v for k, v in base.items()}
    same, broken = fake_run(tmp_path / "same", base), fake_run(tmp_path / "broken", silenced)
    # the broken run first: the base weights must be restored before the next run is loaded
    results = evaluation.main(["--run", str(broken), str(same), "--per-prompt", "1", "--threads", "1"])
    assert results["runs"][1] == results["base"]
    assert results["base"]["shapes_four"] > 0 and results["runs"][0] == {"shapes_four": 0.0, "shapes_four_heldout": 0.0}
    gains, mean, low, high = results["gains"]["shapes_four"]
    assert gains == [pytest.approx(-100 * results["base"]["shapes_four"]), 0.0]
    assert mean == pytest.approx(sum(gains) / 2) and low < mean < high


def test_bad_arguments_stop_before_loading(evaluation, tmp_path: Path, capsys) -> None:
    run = fake_run(tmp_path / "a", {})
    with pytest.raises(SystemExit):
        evaluation.main(["--run", str(run), str(run), "--grid", str(tmp_path / "g.png")])
    assert "single --run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluation.main(["--run", str(tmp_path / "missing")])
    assert "no checkpoints/last.pt" in capsys.readouterr().err
