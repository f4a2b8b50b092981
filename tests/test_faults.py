"""Bad inputs and faults: each is refused before any work with a message naming the problem (and the fix), and
each fault keeps what was finished (checkpoints, the epochs before it).

Most cases need no model (config, files, run folders, checkpoints crafted by hand, the reward server); the
environment cases share one *micro* pipeline; five cases train a micro run for a few epochs: a reward failing
during an evaluation, SIGTERM mid-epoch (in a subprocess), a corrupt newest checkpoint, the checkpoint
rotation, and ``sample --base`` on a full fine-tune.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_mdp.agents import ConfigError, TrainConfig, resume_config, train
from diffusion_mdp.agents.base import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    find_checkpoint,
    from_weights_only,
    load_checkpoint_file,
    prompt_fingerprint,
    to_weights_only,
    upgrade_checkpoint,
)
from diffusion_mdp.agents.cli import main
from diffusion_mdp.agents.config import load_config_file
from diffusion_mdp.agents.train import absolute_paths, check_prompts_unchanged, prepare_run_dir
from diffusion_mdp.mdp import RewardError
from diffusion_mdp.prompts import load_prompts
from diffusion_mdp.rewards import register_reward
from diffusion_mdp.rewards.server import RemoteReward, RemoteRewardError, decode_request, encode_request, serve
from diffusion_mdp.testing import build_reference_tiny_pipeline


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reference_tiny_pipeline(tmp_path_factory.mktemp("micro"), size="micro")


@pytest.fixture(scope="module")
def micro_components(micro: Path):
    from diffusion_mdp.models import load_components

    return load_components(micro)


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
        num_steps=2,
        num_epochs=2,
        samples_per_epoch=4,
        sample_batch_size=2,
        train_batch_size=2,
        stat_min_count=2,
        learning_rate=1e-2,
        clip_range=0.2,
        eval_num_samples=0,
        save_every=1,
        image_every=0,
        progress_bar=False,
        log_formats="csv",
    )
    values.update(changes)
    return TrainConfig.from_dict(values)


def write_checkpoint(run: Path, epoch: int, config: dict[str, object], name: str = "last.pt", **extra: object) -> Path:
    """A hand-made checkpoint in the current format (enough for config/resume/loader checks; no weights)."""
    path = run / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_weights_only({"format": CHECKPOINT_FORMAT, "epoch": epoch, "config": config, **extra}), path)
    return path


# ------------------------------------------------------------------------------------------------
# Every config field: out-of-range values name the field, the range and the fix, before anything loads
# ------------------------------------------------------------------------------------------------
BAD_FIELDS = [
    ({"eta": 1.5}, "eta=1.5 must be in (0, 1]"),
    ({"eta": 0.0}, "eta=0.0 must be in (0, 1]"),
    ({"seed": -1}, "seed=-1 must be in [0, 2**63)"),
    ({"device": "nonsense"}, "device='nonsense': not a torch device"),
    ({"learning_rate": math.inf}, "learning_rate=inf must be a finite number"),
    ({"learning_rate": math.nan}, "learning_rate=nan must be a finite number"),
    ({"clip_range": math.inf}, "clip_range=inf must be a finite number"),
    ({"clip_range": 1.5}, "clip_range=1.5 must be in (0, 1)"),
    ({"guidance_scale": math.inf}, "guidance_scale=inf must be a finite number"),
    ({"guidance_scale": 0.5}, "guidance_scale=0.5 must be >= 1"),
    ({"adam_beta1": 1.0}, "adam_beta1=1.0 must be in [0, 1)"),
    ({"adam_beta2": -0.1}, "adam_beta2=-0.1 must be in [0, 1)"),
    ({"adam_epsilon": 0.0}, "adam_epsilon=0.0 must be > 0"),
    ({"adam_weight_decay": -1.0}, "adam_weight_decay=-1.0 must be >= 0"),
    ({"lr_end": -1.0}, "lr_end=-1.0 must be >= 0"),
    ({"lr_warmup_steps": -1}, "lr_warmup_steps=-1 must be >= 0"),
    ({"max_grad_norm": math.nan}, "max_grad_norm=nan must be a finite number"),
    ({"kl_coef": -0.1}, "kl_coef=-0.1 must be >= 0"),
    ({"algorithm": "sparse_rwr", "kl_coef": 0.1}, "RWR regresses x_0 and has no per-step policy Gaussian"),
    ({"rwr_beta": 0.0}, "rwr_beta=0.0 must be > 0"),
    ({"lora_alpha": 0.0}, "lora_alpha=0.0 must be > 0"),
    ({"timestep_fraction": 0.0}, "timestep_fraction=0.0 must be in (0, 1]"),
    ({"timestep_fraction": 1.5}, "timestep_fraction=1.5 must be in (0, 1]"),
    ({"sparse_rwr_percentile": 1.0}, "sparse_rwr_percentile=1.0 must be in [0, 1)"),
    ({"keep_checkpoints": 1}, "keep_checkpoints=1 must be >= 2"),
    ({"reward_timeout": 0.0}, "reward_timeout=0.0 must be > 0"),
    ({"reward_retries": -1}, "reward_retries=-1 must be >= 0"),
    ({"num_steps": 0}, "num_steps=0 must be >= 1"),
    ({"num_steps": 5000}, "num_steps=5000 exceeds the model's 1000 training timesteps"),
    ({"stat_min_count": 40, "stat_buffer_size": 16}, "stat_min_count=40 exceeds stat_buffer_size=16"),
    ({"name": ".."}, "name='..': a run name is one folder name inside output_dir"),
    ({"name": "a/b"}, "name='a/b': a run name is one folder name"),
    ({"name": ""}, "name='': give a non-empty name"),
    ({"output_dir": ""}, "output_dir is empty"),
    ({"reward": "http://"}, "is not a valid server URL"),
    ({"log_formats": "xml"}, "unknown format 'xml'"),
    ({"num_epochs": 0}, "num_epochs=0 must be >= 1"),
    ({"samples_per_epoch": 10, "sample_batch_size": 4}, "e.g. samples_per_epoch=8"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_FIELDS, ids=[next(iter(c)) + "-" + m[:12] for c, m in BAD_FIELDS])
def test_bad_field_is_refused_with_its_range(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(**changes).validate()  # type: ignore[arg-type]
    assert message in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"CUDA is not available.*device='cpu'"):
        TrainConfig(device="cuda").validate()


def test_wrong_type_built_by_hand_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"num_epochs='3' must be a int"):
        TrainConfig(num_epochs="3").validate()  # type: ignore[arg-type]


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(eta=2.0, seed=-5, adam_beta1=1.5).validate()
    assert all(key in str(err.value) for key in ("eta=2.0", "seed=-5", "adam_beta1=1.5"))


# ------------------------------------------------------------------------------------------------
# Config files: parsed as their extension says, no key silently dropped
# ------------------------------------------------------------------------------------------------
def test_yaml_file_is_parsed_as_yaml(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.001\nnum_epochs: 3\n")
    assert load_config_file(path) == {"learning_rate": 0.001, "num_epochs": 3}


def test_yaml_without_pyyaml_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    path = tmp_path / "run.yml"
    path.write_text("num_epochs: 3\n")
    with pytest.raises(ConfigError, match=r"PyYAML is not installed.*TOML"):
        load_config_file(path)


CONFIG_FILES = [
    ("run.txt", "num_epochs = 3\n", "unknown extension '.txt'"),
    ("run.toml", "num_epochs = 3\n[train]\nlearning_rate = 0.1\n", "keys outside its [train] table: num_epochs"),
    ("run.toml", "[model]\nname = 'x'\n", "model is a table"),
    ("run.toml", "num_epochs = = 3\n", "is not valid TOML"),
    ("run.json", '{"num_epochs": 3, "num_epochs": 4}', "key 'num_epochs' is given twice"),
    ("run.json", "[1, 2]", "must hold key = value pairs"),
    ("run.json", "{num_epochs: 3}", "is not valid JSON"),
]


@pytest.mark.parametrize(("filename", "text", "message"), CONFIG_FILES, ids=[m[:20] for _, _, m in CONFIG_FILES])
def test_bad_config_file_names_the_problem(tmp_path: Path, filename: str, text: str, message: str) -> None:
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_reward_kwargs_table_in_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[train]\nreward = "shapes_geneval_graded"\nreward_kwargs = {attribute_weight = 0.5}\n')
    config = TrainConfig.from_dict(load_config_file(path))
    assert config.reward_arguments == {"attribute_weight": 0.5}
    assert json.loads(config.reward_kwargs) == {"attribute_weight": 0.5}  # kept as the flag's JSON text


def test_non_utf8_config_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_bytes(b"name = '\xff\xfe'\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text.*save it as UTF-8"):
        load_config_file(path)


# ------------------------------------------------------------------------------------------------
# The command line: no abbreviations, sample's flags checked before loading anything
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--learning-rat", "--resum", "--num-epoch"])
def test_flag_prefixes_are_not_flags(flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output-dir", str(tmp_path), flag, "1"] if flag != "--resum" else ["train", flag])
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


SAMPLE_FLAGS = [
    (["--num-steps", "0"], "--num-steps must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--prompt", " "], "--prompt '' is empty"),
    ([], "no checkpoint in"),
]


@pytest.mark.parametrize(("flags", "message"), SAMPLE_FLAGS, ids=[m[:16] for _, m in SAMPLE_FLAGS])
def test_sample_flags_fail_first(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["sample", "--run", str(tmp_path / "nothing"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_sample_refuses_a_pickled_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "old.pt"
    torch.save({"format": 1, "epoch": 1, "config": {}, "rng": np.random.get_state()}, path)
    assert main(["sample", "--checkpoint", str(path)]) == 2
    assert "pickled Python objects" in capsys.readouterr().err


def test_cli_fresh_run_into_a_foreign_folder_changes_nothing(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "out" / "photos"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("mine")
    (folder / "holiday.jpg").write_text("x")
    assert main(["train", "--output-dir", str(tmp_path / "out"), "--name", "photos", "--overwrite"]) == 2
    assert "not a run folder (it holds holiday.jpg) but has config.json" in capsys.readouterr().err
    assert (folder / "config.json").read_text() == "mine"


def test_files_beside_a_run_are_kept(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    prepare_run_dir(run)  # accepted: a run overwrites none of it (benchmarks keep their own files there)
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    prepare_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------------------------
# Run folders: one run each
# ------------------------------------------------------------------------------------------------
def test_crashed_run_without_checkpoint_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "r"
    (run / "logs").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    with pytest.raises(ConfigError, match=r"stopped before its first checkpoint \(2 epoch\(s\).*--overwrite"):
        prepare_run_dir(run)
    assert (run / "metrics.jsonl").is_file()


def test_overwrite_deletes_only_the_old_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "r"
    (run / "images").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run / "config.json").write_text("{}")
    prepare_run_dir(run, overwrite=True)
    assert list(run.iterdir()) == [] and "deleted the previous run" in capsys.readouterr().out


def test_run_with_checkpoint_needs_resume_or_overwrite(tmp_path: Path) -> None:
    run = tmp_path / "r"
    write_checkpoint(run, 3, {})
    with pytest.raises(ConfigError, match=r"already holds a run .*--resume.*--overwrite"):
        prepare_run_dir(run)


def test_run_that_never_trained_may_be_restarted(tmp_path: Path) -> None:
    run = tmp_path / "r"
    (run / "logs").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    prepare_run_dir(run)  # accepted: nothing there to lose
    assert (run / "config.json").is_file()


def test_run_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "r").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a run folder"):
        prepare_run_dir(tmp_path / "r")


def test_train_into_used_folder_fails_before_loading(tmp_path: Path, prompt_file: Path) -> None:
    run = tmp_path / "t"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    cfg = TrainConfig(name="t", output_dir=str(tmp_path), prompts=str(prompt_file), model="/nonexistent-model")
    with pytest.raises(ConfigError):  # the model is refused before anything
        train(cfg)
    cfg = cfg.replace(model="tiny-shapes")
    with pytest.raises(ConfigError, match="stopped before its first checkpoint"):
        train(cfg)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_resume_and_overwrite_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pass one of them"):
        train(TrainConfig(output_dir=str(tmp_path)), resume=True, overwrite=True)


def test_resume_without_checkpoint_in_a_used_folder_does_not_suggest_a_fresh_run(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(ConfigError, match=r"no checkpoint.*nothing to resume.*--overwrite") as err:
        resume_config(run)
    assert "without --resume" not in str(err.value)


def test_resume_from_another_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "elsewhere" / "runs" / "x"
    write_checkpoint(run, 2, {**TrainConfig(name="x").to_dict(), "output_dir": "runs"})
    monkeypatch.chdir(tmp_path)
    config = resume_config(run)
    assert config.run_dir == run  # not ./runs/x, the saved relative output_dir


def test_saved_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("p.txt").write_text("a red circle\n")
    config = absolute_paths(TrainConfig(prompts="p.txt", eval_prompts="shapes_heldout"))
    assert config.prompts == str(tmp_path / "p.txt") and config.eval_prompts == "shapes_heldout"


def test_resume_refuses_a_changed_prompt_file(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    state = {
        "epoch": 4,
        "config": TrainConfig(prompts=str(prompts)).to_dict(),
        "prompt_fingerprints": {"prompts": prompt_fingerprint(load_prompts(prompts))},
    }
    check_prompts_unchanged(state, tmp_path / "last.pt")  # unchanged: fine
    prompts.write_text("a red circle\n# a comment changes nothing\ntwo blue squares\n")
    check_prompts_unchanged(state, tmp_path / "last.pt")
    prompts.write_text("a red circle\nthree green triangles\n")
    with pytest.raises(ConfigError, match=r"prompts file .*p.txt changed since the checkpoint .*epoch 4"):
        check_prompts_unchanged(state, tmp_path / "last.pt")


def test_resume_refuses_a_deleted_prompt_file(tmp_path: Path) -> None:
    state = {"epoch": 1, "config": {"prompts": str(tmp_path / "gone.txt")}, "prompt_fingerprints": {"prompts": "0"}}
    with pytest.raises(ConfigError, match=r"gone.txt.*no longer loads"):
        check_prompts_unchanged(state, tmp_path / "last.pt")


# ------------------------------------------------------------------------------------------------
# Checkpoint files: weights-only, clear errors, fallback to the newest intact one
# ------------------------------------------------------------------------------------------------
def test_numpy_state_round_trips_through_weights_only() -> None:
    state = {"numpy": np.random.get_state(), "scalar": np.float32(1.5), "nested": [np.arange(3)]}
    back = from_weights_only(to_weights_only(state))
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["scalar"] == 1.5 and np.array_equal(back["nested"][0], np.arange(3))


def test_old_format_checkpoint_is_refused_then_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    torch.save({"format": 1, "epoch": 2, "config": {}, "rng": {"numpy": np.random.get_state()}}, path)
    with pytest.raises(CheckpointError, match=r"pickled Python objects.*upgrade_checkpoint") as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value)
    upgrade_checkpoint(path)  # the user's explicit "I trust it"
    assert load_checkpoint_file(path)["epoch"] == 2


def test_truncated_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 1, {}, payload=torch.zeros(1000))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated") as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value)


def test_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a diffusion-mdp checkpoint"):
        load_checkpoint_file(path)


def test_corrupt_newest_falls_back_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_checkpoint(tmp_path, 4, {}, name="epoch0004.pt")
    write_checkpoint(tmp_path, 2, {}, name="epoch0002.pt")
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 not really")
    path, state = find_checkpoint(tmp_path)
    assert path.name == "epoch0004.pt" and state["epoch"] == 4
    err = capsys.readouterr().err
    assert "last.pt is damaged" in err and "Falling back" in err and "epoch 4" in err


def test_no_intact_checkpoint_lists_every_file(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    for name in ("last.pt", "epoch0003.pt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*last.pt.*epoch0003.pt"):
        find_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------
# Prompts and models: errors that name the file / folder
# ------------------------------------------------------------------------------------------------
def test_non_utf8_prompt_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("un caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompt file .*latin1.txt is not UTF-8"):
        load_prompts(path)


def test_empty_prompt_is_refused() -> None:
    with pytest.raises(ValueError, match=r"prompt 0 .* is empty"):
        load_prompts([""])


def test_prompt_file_without_prompts(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=r"empty.txt has no prompts"):
        load_prompts(path)


def test_mistyped_relative_model_folder_is_immediate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusion_mdp.models import resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "sd-tiny").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"model folder models/sd-tiy does not exist; .*sd-tiny"):
        resolve_model("models/sd-tiy")


@pytest.mark.parametrize(("model", "message"), [("tiny-shapez", "did you mean 'tiny-shapes'"), ("a/b/c", "a/b/c")])
def test_model_that_cannot_be_a_hub_id(model: str, message: str) -> None:
    from diffusion_mdp.models import resolve_model

    with pytest.raises(FileNotFoundError, match=message):
        resolve_model(model)
    with pytest.raises(ConfigError, match="model:"):
        TrainConfig(model=model).validate()


# ------------------------------------------------------------------------------------------------
# Environments and the policy
# ------------------------------------------------------------------------------------------------
def micro_env(components, **kwargs):
    from diffusion_mdp.envs.vector import DenoisingVectorEnv

    return DenoisingVectorEnv(2, components=components, prompts=["a red circle"], num_steps=2, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"eta": 1.5}, "eta must be > 0 and <= 1, got 1.5"), ({"device": "nonsense"}, "'nonsense' is not a torch device")],
)
def test_env_refuses_bad_arguments(micro_components, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        micro_env(micro_components, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_env_on_cuda_without_cuda(micro_components) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        micro_env(micro_components, device="cuda")


@pytest.mark.parametrize(
    ("seed", "error"), [("abc", TypeError), (1.5, TypeError), (-1, ValueError), ([0, -2], ValueError)]
)
def test_vector_reset_refuses_bad_seeds(micro_components, seed, error) -> None:
    env = micro_env(micro_components)
    with pytest.raises(error, match="seed"):
        env.reset(seed=seed)


def test_vector_reset_takes_numpy_integer_seeds(micro_components) -> None:
    env = micro_env(micro_components)
    first, _ = env.reset(seed=np.int64(3))
    second, _ = env.reset(seed=3)
    assert np.array_equal(first["latent"], second["latent"])
    third, _ = env.reset(seed=[np.int64(3), np.int64(4)])
    assert np.array_equal(first["latent"], third["latent"])


def test_policy_sample_on_a_deterministic_schedule(micro_components) -> None:
    from diffusion_mdp.ddim import DDIMSchedule
    from diffusion_mdp.policy import DiffusionPolicy

    env = micro_env(micro_components)
    obs, _ = env.reset(seed=0)
    policy = DiffusionPolicy(micro_components, DDIMSchedule.from_scheduler(micro_components.scheduler, 2, eta=0.0))
    with pytest.raises(ValueError, match=r"needs a stochastic schedule.*eta=0.0.*sample_deterministic"):
        policy.sample(obs)


@pytest.mark.parametrize(
    ("result", "message"),
    [((np.zeros(2), None), "info a dict"), ((["good", "bad"], {}), "not numbers"), (np.zeros(2), "(rewards, info)")],
    ids=["info-None", "strings", "no-tuple"],
)
def test_bad_reward_returns_are_reward_errors(micro_components, result, message) -> None:
    env = micro_env(micro_components, reward=lambda images, prompts, metadata: result)
    obs, _ = env.reset(seed=0)
    env.step(obs["latent"])
    with pytest.raises(RewardError, match=r"reward .*" + message.replace("(", r"\(").replace(")", r"\)")):
        env.step(obs["latent"])


def test_long_prompts_warn_that_they_are_cut(micro_components) -> None:
    from diffusion_mdp.ddim import DDIMSchedule
    from diffusion_mdp.policy import DiffusionPolicy

    policy = DiffusionPolicy(micro_components, DDIMSchedule.from_scheduler(micro_components.scheduler, 2))
    limit = micro_components.tokenizer.model_max_length
    with pytest.warns(UserWarning, match=f"exceed the tokenizer's {limit} tokens"):
        policy.encode_prompts([" ".join(["red"] * (limit + 5))])


# ------------------------------------------------------------------------------------------------
# The reward server: a token beyond loopback, a size limit; the client's timeout, retries and progress
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def start_server():
    servers = []

    def start(reward, **kwargs):
        server = serve(reward, "127.0.0.1", 0, **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def small_images(n: int = 2, size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


def test_server_beyond_loopback_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFUSION_MDP_REWARD_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"exposes the reward .* --token"):
        serve("jpeg_compressibility", "0.0.0.0", 0)


def test_server_token_is_required_and_accepted(start_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFUSION_MDP_REWARD_TOKEN", raising=False)
    url = start_server("jpeg_compressibility", token="s3cret")
    with pytest.raises(RemoteRewardError, match=r"HTTP 401.*wrong token.*reward_token"):
        RemoteReward(url, timeout=5, retries=2, backoff=0.01)(small_images(), ["a", "b"], [{}, {}])
    values, _ = RemoteReward(url, timeout=5, token="s3cret")(small_images(), ["a", "b"], [{}, {}])
    assert values.shape == (2,) and np.isfinite(values).all()
    monkeypatch.setenv("DIFFUSION_MDP_REWARD_TOKEN", "s3cret")
    assert RemoteReward(url, timeout=5).health()["status"] == "ok"


def test_server_refuses_a_request_over_the_limit(start_server) -> None:
    url = start_server("jpeg_compressibility", max_request_bytes=4000)
    with pytest.raises(RemoteRewardError, match=r"HTTP 413.*expected 1\.\.4000"):
        RemoteReward(url, timeout=5, retries=0)(small_images(4, 32), ["a"] * 4, [{}] * 4)


def test_compressed_request_cannot_inflate_past_the_limit() -> None:
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=np.zeros((64, 64, 64, 3), np.uint8), request=np.array('{"prompts": []}'))
    body = buffer.getvalue()
    assert len(body) < 100_000
    with pytest.raises(ValueError, match=r"hold \d+ bytes; the limit is 100000"):
        decode_request(body, max_bytes=100_000)


def test_request_with_mismatched_prompts_is_refused() -> None:
    body = encode_request(small_images(2), ["only one"], [{}])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        decode_request(body)


def test_slow_server_times_out_with_progress(start_server, capsys: pytest.CaptureFixture[str]) -> None:
    release = threading.Event()

    def slow(images, prompts, metadata):
        release.wait(10)
        return np.zeros(len(images)), {}

    url = start_server(slow)
    client = RemoteReward(url, timeout=0.6, retries=0, progress_every=0.2)
    with pytest.raises(RemoteRewardError, match=r"1 attempt\(s\) \(timeout 0.6s each; raise reward_timeout"):
        client(small_images(), ["a", "b"], [{}, {}])
    release.set()
    assert f"waiting for reward server {url}" in capsys.readouterr().err


def test_client_defaults_notice_a_stall_in_minutes() -> None:
    client = RemoteReward("http://127.0.0.1:1")
    worst = client.timeout * (client.retries + 1) + client.backoff * (2**client.retries - 1)
    assert worst <= 300, worst  # not 40 minutes per batch
    assert TrainConfig().reward_timeout == client.timeout and TrainConfig().reward_retries == client.retries


@pytest.mark.parametrize(("kwargs", "message"), [({"timeout": 0}, "timeout must be"), ({"retries": -1}, "retries")])
def test_client_refuses_bad_settings(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        RemoteReward("http://127.0.0.1:1", **kwargs)


def test_reward_token_is_never_written_to_the_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "r"
    write_checkpoint(run, 1, {**TrainConfig(name="r").to_dict(), "reward_token": ""})
    config = resume_config(run, {"reward_token": "s3cret"})  # resumable: the token comes from the user again
    assert config.reward_token == "s3cret"


# ------------------------------------------------------------------------------------------------
# Faults during training: what is kept
# ------------------------------------------------------------------------------------------------
_EVAL = {"fail": True, "eval_calls": 0}


@register_reward("_faults_eval_fails")
def _eval_fails_factory():
    def reward(images, prompts, metadata):
        if prompts[0] in ("two red circles", "three blue squares"):  # the evaluation prompts
            _EVAL["eval_calls"] += 1
            if _EVAL["fail"] and _EVAL["eval_calls"] >= 2:  # the evaluation after epoch 2 (epoch 0's works)
                raise RuntimeError("captioner out of memory")
        return -images.reshape(len(images), -1).mean(axis=1).astype(np.float64), {}

    return reward


def test_reward_failing_during_evaluation_keeps_the_epochs(micro: Path, prompt_file: Path, tmp_path: Path) -> None:
    eval_prompts = tmp_path / "eval.txt"
    eval_prompts.write_text("two red circles\nthree blue squares\n")
    _EVAL.update(fail=True, eval_calls=0)
    # save_every=5 > eval_every=2: before this fix the two trained epochs were lost with the evaluation.
    cfg = tiny_config(
        micro,
        prompt_file,
        tmp_path,
        reward="_faults_eval_fails",
        eval_prompts=str(eval_prompts),
        eval_num_samples=2,
        eval_every=2,
        save_every=5,
        num_epochs=3,
    )
    with pytest.raises(RewardError) as err:
        train(cfg)
    message = str(err.value)
    assert "evaluation after epoch 2" in message and "'_faults_eval_fails'" in message
    assert "captioner out of memory" in message and "--resume" in message
    run = tmp_path / "t"
    kept = load_checkpoint_file(run / "checkpoints" / "last.pt")
    assert kept["epoch"] == 2 and len(kept["history"]) == 2 and kept["eval_pending"]
    _EVAL["fail"] = False  # the reward is fixed: resume redoes the evaluation, then finishes
    resumed, summary = train(resume_config(run), resume=True)
    assert [e["epoch"] for e in resumed.eval_history] == [0, 2, 3]
    assert summary["epochs"] == 3 and (run / "summary.json").is_file() and (run / "lora").is_dir()


_SIGTERM_SCRIPT = """
import os, signal, sys
import numpy as np
from diffusion_mdp.rewards import register_reward

calls = {"n": 0}

@register_reward("_faults_sigterm")
def factory():
    def reward(images, prompts, metadata):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 2, first sample batch: preempted mid-epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return -images.reshape(len(images), -1).mean(axis=1).astype(np.float64), {}
    return reward

from diffusion_mdp.agents.cli import main
sys.exit(main(sys.argv[1:]))
"""


@register_reward("_faults_sigterm")
def _sigterm_factory_here():  # the same reward in this process (for the resume), without the signal
    def reward(images, prompts, metadata):
        return -images.reshape(len(images), -1).mean(axis=1).astype(np.float64), {}

    return reward


def test_sigterm_mid_epoch_saves_that_epoch(micro: Path, prompt_file: Path, tmp_path: Path) -> None:
    script = tmp_path / "preempted.py"
    script.write_text(textwrap.dedent(_SIGTERM_SCRIPT))
    out = tmp_path / "runs"
    flags = [
        *("train", "--model", str(micro), "--prompts", str(prompt_file), "--reward", "_faults_sigterm"),
        *("--num-steps", "2", "--num-epochs", "3", "--samples-per-epoch", "4", "--sample-batch-size", "2"),
        *("--train-batch-size", "2", "--stat-min-count", "2", "--eval-num-samples", "0", "--save-every", "10"),
        *("--image-every", "0", "--no-progress-bar", "--log-formats", "csv", "--output-dir", str(out), "--name", "p"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert "SIGTERM: finishing this epoch" in done.stdout and "stopped after epoch 2 (SIGTERM)" in done.stderr
    assert "--resume" in done.stderr
    run = out / "p"
    kept = load_checkpoint_file(run / "checkpoints" / "last.pt")
    assert kept["epoch"] == 2 and len(kept["history"]) == 2  # save_every=10: without the handler, nothing
    resumed, _ = train(resume_config(run), resume=True)
    assert len(resumed.history) == 3 and resumed.history[:2] == kept["history"]


def test_corrupt_newest_checkpoint_resumes_from_the_one_before(
    micro: Path, prompt_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(micro, prompt_file, tmp_path, num_epochs=3, use_lora=False, keep_checkpoints=2)
    straight, _ = train(cfg)
    run = tmp_path / "t"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch0002.pt", "last.pt"]  # K = 2 kept
    newest = run / "checkpoints" / "last.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # e.g. a disk that filled up
    capsys.readouterr()
    resumed, _ = train(resume_config(run, {"num_epochs": 3}), resume=True)
    err = capsys.readouterr().err
    assert "last.pt is damaged or truncated" in err and "epoch0002.pt (epoch 2)" in err
    assert resumed.history == straight.history  # epoch 3 redone, bit for bit
    assert (run / "checkpoints" / "unreadable-last.pt").is_file()  # kept aside, never resumed from

    # sample --base on this full fine-tune renders the model as loaded, not the fine-tuned UNet
    base_png, tuned_png = tmp_path / "base.png", tmp_path / "tuned.png"
    common = ["sample", "--run", str(run), "--num-samples", "2", "--num-steps", "2"]
    assert main([*common, "--base", "--out", str(base_png)]) == 0
    assert "--base: rendering" in capsys.readouterr().out
    assert main([*common, "--out", str(tuned_png)]) == 0
    from PIL import Image

    assert not np.array_equal(np.asarray(Image.open(base_png)), np.asarray(Image.open(tuned_png)))


def test_sigterm_and_sighup_handlers_are_installed_and_restored(micro: Path, prompt_file: Path, tmp_path) -> None:
    from diffusion_mdp.agents import make_agent

    agent = make_agent(tiny_config(micro, prompt_file, tmp_path, num_epochs=1))
    original = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for sig in original:  # as in a plain shell (under nohup SIGHUP is SIG_IGN, which the agent leaves alone)
            signal.signal(sig, signal.SIG_DFL)
        with agent._interrupt_handler():
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
            assert agent._stop_requested and agent._stop_signal == signal.SIGHUP
        assert all(signal.getsignal(sig) is signal.SIG_DFL for sig in original)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with agent._interrupt_handler():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # nohup's choice is kept
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)


def test_config_json_of_a_run_holds_no_token(micro: Path, prompt_file: Path, tmp_path: Path) -> None:
    cfg = tiny_config(micro, prompt_file, tmp_path, num_epochs=1, reward_token="s3cret")
    train(cfg)
    run = tmp_path / "t"
    assert json.loads((run / "config.json").read_text())["reward_token"] == ""
    assert load_checkpoint_file(run / "checkpoints" / "last.pt")["config"]["reward_token"] == ""


def test_agent_passes_the_remote_reward_settings(micro: Path, prompt_file: Path, tmp_path: Path) -> None:
    from diffusion_mdp.agents import make_agent

    cfg = tiny_config(
        micro, prompt_file, tmp_path, reward="http://127.0.0.1:1", reward_timeout=5.0, reward_retries=0,
        reward_token="k",
    )
    client = make_agent(cfg).mdp.reward_fn  # nothing is contacted until a batch is scored
    assert isinstance(client, RemoteReward)
    assert (client.timeout, client.retries, client.token) == (5.0, 0, "k")
