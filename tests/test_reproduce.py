"""benchmarks/reproduce/ (what ``python benchmarks/reproduce.py`` runs), smoke configuration: index, tables,
figures, skipping and resuming runs.

The budget is shrunk through the driver's own flags (1 epoch of 4 samples, 2 denoising steps, 2 images per
measurement, batches of 4) on a shrunk reference tiny pipeline (the reference architecture at 16×16 pixels,
latents 4×8×8: the reference's 32×32 latents spend most of a CPU run in attention), so the whole file takes
well under 90 s on 2 cores; the machinery is the quick mode's (same functions, only the numbers differ).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_reproduce() -> ModuleType:
    package = ROOT / "benchmarks" / "reproduce"
    spec = importlib.util.spec_from_file_location(
        "reproduce", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


reproduce = _load_reproduce()


@pytest.fixture(scope="module")
def micro_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference tiny pipeline's structure (SD's UNet/VAE/CLIP/DDIM), shrunk to 16×16 images."""
    from diffusion_mdp.testing import build_reference_tiny_pipeline

    return build_reference_tiny_pipeline(tmp_path_factory.mktemp("micro-pipeline"), size="micro")


def smoke_args(model: Path, out: Path, methods: list[str]) -> list[str]:
    return [
        "--out", str(out),
        "--model", str(model),
        "--threads", "1",
        "--jobs", "1",
        "--tasks", "compressibility",
        "--methods", *methods,
        "--seeds", "0",
        "--epochs", "1",
        "--samples-per-epoch", "4",
        "--eval-samples", "2",
        "--num-steps", "2",
        "--set", "sample_batch_size=4",
        "--set", "train_batch_size=4",
        "--set", "eval_num_samples=2",
        "--set", "stat_min_count=2",
    ]  # fmt: skip


def test_quick_mode_budget_is_equal_queries_for_every_method() -> None:
    args = reproduce.parse_args(["--quick"])
    budget = reproduce.budget_from_args(args)
    assert budget.mode == "quick" and set(budget.methods) == set(reproduce.METHODS)
    assert budget.queries_per_run == budget.num_epochs * budget.samples_per_epoch
    assert len(reproduce.FULL.runs()) == 4 * 3 * 3  # 4 methods × 3 tasks × 3 seeds
    # The quick runs are runs of the full grid (same per-run budget), so a later full run reuses them.
    assert set(budget.runs()) <= set(reproduce.FULL.runs())
    assert budget.queries_per_run == reproduce.FULL.queries_per_run


def test_label_names_a_changed_budget_only() -> None:
    args = reproduce.parse_args(["--set", "rwr_beta=0.1", "--methods", "rwr", "--label", "rwr-beta"])
    budget = reproduce.budget_from_args(args)
    assert budget.mode == "rwr-beta" and budget.overrides[-1] == ("rwr_beta", "0.1")
    with pytest.raises(SystemExit, match="keeps its name"):
        reproduce.budget_from_args(reproduce.parse_args(["--quick", "--label", "renamed"]))


def test_smoke_grid_index_table_plots_skip_and_resume(
    micro_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "reproduce"
    index = reproduce.main(smoke_args(micro_pipeline, out, ["ddpo_is", "rwr"]))

    # Results index with both runs, each with a curve, a trace (epoch 0 and 1) and the queries it spent.
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["runs"]) == {"compressibility-ddpo_is-s0", "compressibility-rwr-s0"}
    for record in saved["runs"].values():
        assert record["status"] == "done" and record["queries"] == 4
        assert [p["epoch"] for p in record["trace"]] == [0, 1]
        assert set(record["trace"][0]["scores"]) == {"shapes_train", "shapes_heldout"}
        assert len(record["curve"]) == 1
    # The same model before training, on the same noise: both runs measure the same epoch-0 scores.
    before = [r["trace"][0]["scores"]["shapes_heldout"]["reward"] for r in saved["runs"].values()]
    assert before[0] == pytest.approx(before[1])

    # Table rows and figures.
    report = (out / "results.md").read_text()
    assert "| JPEG compressibility | DDPO-IS |" in report and "| JPEG compressibility | RWR |" in report
    for name in ("reward_vs_queries.png", "overoptimisation.png", "grid_compressibility.png"):
        assert (out / name).stat().st_size > 1000, name

    # A rerun skips finished runs entirely.
    def must_not_run(*args: object, **kwargs: object) -> dict:
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(reproduce.measurement, "execute_run", must_not_run)  # where run_grid looks it up
    assert reproduce.main(smoke_args(micro_pipeline, out, ["ddpo_is", "rwr"]))["runs"] == index["runs"]
    monkeypatch.undo()

    # An interrupted run (killed after its checkpoint, before its final measurement) resumes from the
    # agents' checkpoint: no epoch is trained twice, and the grid gains the run.
    real_measure = reproduce.measure
    calls = {"n": 0}

    def measure_then_die(*args: object, **kwargs: object):
        calls["n"] += 1
        if calls["n"] == 2:  # 1: the base model (epoch 0), 2: after epoch 1
            raise KeyboardInterrupt
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(reproduce.measurement, "measure", measure_then_die)
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(smoke_args(micro_pipeline, out, ["ddpo_sf"]))
    run_dir = out / "runs" / "compressibility-ddpo_sf-s0"
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert "compressibility-ddpo_sf-s0" not in json.loads((out / "results.json").read_text())["runs"]
    monkeypatch.undo()

    index = reproduce.main(smoke_args(micro_pipeline, out, ["ddpo_sf"]))
    record = index["runs"]["compressibility-ddpo_sf-s0"]
    assert record["status"] == "done" and [p["epoch"] for p in record["trace"]] == [0, 1]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1 trained once
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 3  # the folder's index: every run
    assert "| JPEG compressibility | DDPO-SF |" in (out / "results.md").read_text()

    # A different per-run budget into the same folder is refused instead of mixing incomparable runs.
    with pytest.raises(SystemExit, match="different per-run budget"):
        reproduce.main([*smoke_args(micro_pipeline, out, ["ddpo_is"]), "--epochs", "2"])

    # runs/ is not in git: a fresh checkout imports the published runs (records + the grids' images) and
    # rebuilds the same report without running anything.
    all_methods = ["ddpo_is", "rwr", "ddpo_sf"]
    docs = tmp_path / "docs"
    reproduce.main([*smoke_args(micro_pipeline, out, all_methods), "--report-only", "--publish", str(docs)])
    published = json.loads((docs / "custom" / "results.json").read_text())
    assert len(published["runs"]) == 3
    assert sorted(p.name for p in (docs / "custom" / "runs" / "compressibility-ddpo_is-s0").iterdir()) == [
        "eval_images_epoch0000.npz",  # the grid's base row
        "eval_images_epoch0001.npz",
    ]
    fresh = tmp_path / "fresh-checkout"
    monkeypatch.setattr(reproduce.measurement, "execute_run", must_not_run)
    rebuilt = reproduce.main([*smoke_args(micro_pipeline, fresh, all_methods), "--import", str(docs / "custom")])
    monkeypatch.undo()
    assert {k: {f: v for f, v in r.items() if f != "imported_from"} for k, r in rebuilt["runs"].items()} == (
        published["runs"]
    )
    assert all(r["imported_from"] == str(docs / "custom") for r in rebuilt["runs"].values())
    grid = "grid_compressibility.png"
    assert (fresh / grid).read_bytes() == (docs / "custom" / grid).read_bytes()  # same images, same picture
    assert "3 of these runs were imported" in (fresh / "results.md").read_text()
    # Importing again keeps what the folder has; a grid of another per-run budget refuses the import.
    budget = reproduce.budget_from_args(reproduce.parse_args(smoke_args(micro_pipeline, fresh, all_methods)))
    assert reproduce.import_published(docs / "custom", fresh, budget) == []
    with pytest.raises(SystemExit, match="not comparable"):
        reproduce.import_published(docs / "custom" / "results.json", tmp_path / "other", reproduce.FULL)


def test_grid_examples_run() -> None:
    import doctest

    result = doctest.testmod(reproduce.grid)
    assert result.attempted > 0 and result.failed == 0


def test_cell_settings_are_what_the_run_trains_with() -> None:
    """A record's ``settings`` (:func:`run_settings`) are the run's ``TrainConfig`` values, cell by cell."""
    for task in reproduce.TASKS:
        for method in reproduce.METHODS:
            config = reproduce.run_config(reproduce.FULL, task, method, 0, Path("unused"), "tiny-shapes", 1)
            settings = reproduce.run_settings(task, method, reproduce.FULL.overrides)
            assert settings == reproduce.settings_text({key: getattr(config, key) for key in settings})
    anchored = reproduce.run_config(reproduce.FULL, "alignment", "ddpo_is", 0, Path("unused"), "tiny-shapes", 1)
    assert anchored.kl_coef == reproduce.KL_COEF > 0 and not anchored.use_lora  # the frozen-copy reference
    rwr = reproduce.run_config(reproduce.FULL, "alignment", "rwr", 0, Path("unused"), "tiny-shapes", 1)
    assert rwr.kl_coef == 0


def test_runs_of_other_settings_are_refused_or_left_out(tmp_path: Path) -> None:
    """A finished run whose cell now runs with other settings must not pass as this grid's: the folder is refused
    before any work, naming the difference; an import leaves it out (it runs again)."""
    def record(task: str, method: str, **extra: object) -> dict:
        return {"task": task, "method": method, "seed": 0, "status": "done", **extra}

    # Published before records held settings: the alignment DDPO-IS run ran without the KL anchor.
    published = tmp_path / "published"
    runs = {"alignment-ddpo_is-s0": record("alignment", "ddpo_is"),
            "compressibility-ddpo_is-s0": record("compressibility", "ddpo_is")}  # fmt: skip
    (published).mkdir()
    (published / "results.json").write_text(json.dumps({"budget": asdict(reproduce.FULL), "runs": runs}))
    out = tmp_path / "out"
    assert reproduce.import_published(published, out, reproduce.FULL) == ["compressibility-ddpo_is-s0"]
    index = reproduce.collect_records(out, reproduce.load_index(out, reproduce.FULL))
    assert set(index["runs"]) == {"compressibility-ddpo_is-s0"}
    assert index["runs"]["compressibility-ddpo_is-s0"]["settings"] == reproduce.run_settings(
        "compressibility", "ddpo_is", reproduce.FULL.overrides
    )

    stale = out / "runs" / "alignment-ddpo_is-s0"
    stale.mkdir(parents=True)
    (stale / "record.json").write_text(json.dumps(record("alignment", "ddpo_is")))
    with pytest.raises(SystemExit, match=r"kl_coef \(unset\) → 1\.0.*delete that folder"):
        reproduce.collect_records(out, reproduce.load_index(out, reproduce.FULL))
    settings = reproduce.run_settings("alignment", "ddpo_is", reproduce.FULL.overrides)
    (stale / "record.json").write_text(json.dumps(record("alignment", "ddpo_is", settings=settings)))
    assert "alignment-ddpo_is-s0" in reproduce.collect_records(out, reproduce.load_index(out, reproduce.FULL))["runs"]


def test_publish_copies_report_and_figures(tmp_path: Path) -> None:
    out, target = tmp_path / "out", tmp_path / "docs"
    out.mkdir()
    (out / "results.md").write_text("# r\n\n![curves](reward_vs_queries.png)\n")
    (out / "reward_vs_queries.png").write_bytes(b"png")
    (out / "grid_incompressibility.png").write_bytes(b"another mode's figure, not in the report: not published")
    (target / "quick").mkdir(parents=True)
    (target / "quick" / "grid_alignment.png").write_bytes(b"an earlier grid's figure")
    (target / "quick" / "notes.txt").write_text("not a report file: kept")
    (target / "quick" / "runs" / "old-run").mkdir(parents=True)
    (target / "quick" / "runs" / "old-run" / "eval_images_epoch0000.npz").write_bytes(b"an earlier run's images")
    (out / "runs" / "new-run").mkdir(parents=True)
    (out / "runs" / "new-run" / "eval_images_epoch0010.npz").write_bytes(b"images")
    dest = reproduce.publish(
        [out / "results.md", out / "reward_vs_queries.png"],
        target,
        "quick",
        run_files=[out / "runs" / "new-run" / "eval_images_epoch0010.npz"],
    )
    assert dest == target / "quick"
    assert {p.name for p in dest.iterdir()} == {"results.md", "reward_vs_queries.png", "notes.txt", "runs"}
    assert [p.relative_to(dest).as_posix() for p in (dest / "runs").rglob("*.npz")] == [
        "runs/new-run/eval_images_epoch0010.npz"
    ]


def test_the_documented_command_runs_the_package() -> None:
    """``python benchmarks/reproduce.py`` (README, docs/results.md) still starts the reproduction's CLI."""
    import subprocess

    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert reproduce.DESCRIPTION in " ".join(result.stdout.split())
