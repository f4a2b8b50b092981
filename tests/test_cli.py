"""The ``diffusion-mdp`` command line: bad input fails early and clearly; train, resume and sample work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusion_mdp.agents.cli import main


def test_bad_flags_fail_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    assert main(["train", "--output-dir", str(out), "--samples-per-epoch", "10", "--sample-batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "samples_per_epoch=10 is not a multiple of sample_batch_size=4" in err and "e.g. samples_per_epoch=8" in err
    assert main(["train", "--output-dir", str(out), "--algorithm", "ppo"]) == 2
    assert "choose one of ddpo_is" in capsys.readouterr().err
    bad_file = tmp_path / "run.toml"
    bad_file.write_text("learning_rte = 0.1\n")
    assert main(["train", "--output-dir", str(out), "--config", str(bad_file)]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(out), "--name", "x", "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--num-epochs", "many"])
    assert not out.exists()


def test_train_resume_and_sample(reference_pipeline: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    config = tmp_path / "run.toml"
    config.write_text(
        f'[train]\nmodel = "{reference_pipeline}"\nprompts = "{prompts}"\nnum_steps = 2\nsamples_per_epoch = 2\n'
        "sample_batch_size = 2\ntrain_batch_size = 2\neval_num_samples = 2\nstat_min_count = 1\n"
    )
    common = ["--output-dir", str(tmp_path / "runs"), "--name", "cli"]
    assert main(["train", "--config", str(config), *common, "--num-epochs", "1", "--no-progress-bar"]) == 0
    assert main(["train", *common, "--resume", "--num-epochs", "2"]) == 0
    run = tmp_path / "runs" / "cli"
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["sample", "--run", str(run), "--num-samples", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
