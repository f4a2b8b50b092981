"""The grid of the reproduction: tasks, methods, budgets, and the results index of an output folder.

A :class:`Budget` names what a mode runs (tasks × methods × seeds) and each run's reward-query budget;
:data:`FULL` and :data:`QUICK` are the two published ones. Every run lives in ``<out>/runs/<name>/`` and
writes ``record.json`` last; ``<out>/results.json`` is the union of the records (:func:`collect_records`),
refused when written with another per-run budget (:func:`load_index`). :func:`import_published` seeds an
output folder with a published grid's finished runs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

METHODS: tuple[str, ...] = ("ddpo_is", "ddpo_sf", "rwr", "sparse_rwr")
METHOD_LABELS: dict[str, str] = {
    "ddpo_is": "DDPO-IS",
    "ddpo_sf": "DDPO-SF",
    "rwr": "RWR",
    "sparse_rwr": "sparse RWR",
}
METHOD_COLOURS: dict[str, str] = {"ddpo_is": "C0", "ddpo_sf": "C1", "rwr": "C2", "sparse_rwr": "C3"}
HELDOUT_SET = "shapes_heldout"
SEEN_SET = "shapes_train"
INDEX_FORMAT = 1


@dataclass(frozen=True)
class Task:
    """One of the paper's reward functions, on tiny-shapes prompts."""

    name: str
    reward: str
    prompts: str
    label: str


TASKS: dict[str, Task] = {
    "compressibility": Task("compressibility", "jpeg_compressibility", "shapes_train", "JPEG compressibility"),
    "incompressibility": Task("incompressibility", "jpeg_incompressibility", "shapes_train", "JPEG incompressibility"),
    "alignment": Task("alignment", "prompt_alignment", "shapes_counting", "prompt alignment (counting)"),
}


@dataclass(frozen=True)
class Budget:
    """What a mode runs: the grid (tasks × methods × seeds) and each run's reward-query budget.

    Attributes:
        mode: Label of the budget (``full``, ``quick``, or ``custom`` / ``--label``); outputs go to
            ``<out>/``, published figures to ``<publish>/<mode>/``.
        tasks: Task names (keys of :data:`TASKS`).
        methods: Algorithms (``ddpo_is``, ``ddpo_sf``, ``rwr``, ``sparse_rwr``).
        seeds: Seeds; every (task, method) runs once per seed.
        num_epochs: Epochs per run.
        samples_per_epoch: Samples (= reward queries) per epoch; a multiple of 16 (the preset's batch).
        trace_every: Measure the run (3 prompt sets × 3 scores) every this many epochs (and at 0 and the end).
        eval_samples: Images per prompt set per measurement (fixed noise, η = 0).
        num_steps: Denoising steps T (0: the preset's 10).
        overrides: Further ``TrainConfig`` fields ``(key, value)`` for every run (``--set key=value``).
    """

    mode: str
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    num_epochs: int
    samples_per_epoch: int
    trace_every: int
    eval_samples: int
    num_steps: int = 0
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def queries_per_run(self) -> int:
        """Reward queries of one run's training (evaluation excluded)."""
        return self.num_epochs * self.samples_per_epoch

    def runs(self) -> list[tuple[str, str, int]]:
        """(task, method, seed) in the order they run: seed-major, so a partial grid has whole seeds."""
        return [(t, m, s) for s in self.seeds for t in self.tasks for m in self.methods]


# The full grid: 4 methods × 3 tasks × 3 seeds = 36 runs of 10 epochs × 64 samples = 640 reward queries each,
# measured at epochs 0, 5 and 10 on 16 images per prompt set. The recipe is the one that learns on tiny-shapes
# (docs/agents.md, "Tuning on tiny-shapes"): the whole UNet fine-tuned, big sample batches, few AdamW steps.
# 640 queries is ~1/6 of the preset's budget (30 × 128), so lr 1e-4 instead of the preset's 5e-5 and 64
# samples per epoch instead of 128 (lessons 2 and 5 gain with exactly this: 10 × 64 at 1e-4). How an epoch's
# samples become updates follows the paper's appendix D.1: DDPO-SF accumulates all of them into one update;
# DDPO-IS splits them into minibatches of 32 and takes one update per minibatch (2 per epoch; the second is
# off-policy, which is what the clip is for); RWR and sparse RWR take the same 2 updates as DDPO-IS.
FULL = Budget(
    "full",
    tuple(TASKS),
    METHODS,
    (0, 1, 2),
    num_epochs=10,
    samples_per_epoch=64,
    trace_every=5,
    eval_samples=16,
    overrides=(("learning_rate", "1e-4"), ("train_batch_size", "32"), ("gradient_accumulation_steps", "1")),
)
# Quick: the 4 runs of the full grid on JPEG compressibility with seed 0 (all 4 methods; the same per-run
# budget, so they count towards the full grid when both use the same --out).
QUICK = replace(FULL, mode="quick", tasks=("compressibility",), seeds=(0,))


# Settings of single cells, on top of the preset and under the budget's overrides (so ``--set`` still wins).
# Prompt alignment starts saturated (the base model scores ~0.93), so per-prompt normalisation turns the
# captioner's noise into full-size advantages; at lr 1e-4 DDPO-IS and DDPO-SF then random-walk away from the
# reward they optimise (-0.155 and -0.087 in the grid first published). A KL penalty to the pre-trained
# policy (β = kl_coef; in full fine-tuning its reference is a frozen copy of the UNet) holds them near it: in
# a sweep on seed 0, soft alignment 0.917 → 0.792 without it, → 0.917 with β = 1 and with β = 10
# (docs/results.md, "Why DDPO-SF, RWR and alignment training lower their own reward"). RWR's loss has no
# policy Gaussian to anchor, so its cells keep the grid's settings.
KL_COEF = 1.0
CELL_SETTINGS: dict[tuple[str, str], dict[str, Any]] = {
    ("alignment", "ddpo_is"): {"kl_coef": KL_COEF},
    ("alignment", "ddpo_sf"): {"kl_coef": KL_COEF},
}
# Preset fields that are not a run's training settings: the cell, the budget (checked on its own) and the
# bookkeeping set them per run.
NOT_SETTINGS = frozenset({"name", "model", "algorithm", "reward", "prompts", "eval_prompts", "num_epochs",
                          "samples_per_epoch", "num_steps", "save_every", "eval_every", "eval_num_samples",
                          "image_every", "num_threads"})  # fmt: skip


def settings_text(settings: dict[str, Any]) -> dict[str, str]:
    """``TrainConfig`` values as comparable text: ``1e-5``, ``"1e-5"`` and ``1e-05`` are one value, so are
    ``False`` and ``"false"``.

    >>> settings_text({"learning_rate": "1e-5", "use_lora": False}) == settings_text({"learning_rate": 1e-05,
    ...                                                                              "use_lora": "false"})
    True
    """

    def text(value: Any) -> str:
        if isinstance(value, bool) or str(value).lower() in ("true", "false"):
            return str(value).lower()
        try:
            return repr(float(value))
        except (TypeError, ValueError):
            return str(value)

    return {key: text(value) for key, value in sorted(settings.items())}


def settings_difference(ran: dict[str, str], wanted: dict[str, str]) -> str:
    """``key ran → wanted`` for every setting that differs, e.g. ``learning_rate 0.0001 → 1e-05``."""
    return ", ".join(f"{k} {ran.get(k, '(unset)')} → {wanted.get(k, '(unset)')}" for k in sorted({*ran, *wanted})
                     if ran.get(k) != wanted.get(k))  # fmt: skip


def run_settings(
    task: str, method: str, overrides: Sequence[Sequence[str]], cell_settings: dict[str, Any] | None = None
) -> dict[str, str]:
    """The training settings of a run of the grid: the ``tiny-shapes`` preset, the cell's :data:`CELL_SETTINGS`
    (or ``cell_settings``), then the budget's overrides, less :data:`NOT_SETTINGS`.

    >>> run_settings("alignment", "ddpo_is", [])["kl_coef"] == repr(KL_COEF)
    True
    >>> run_settings("alignment", "ddpo_is", [("kl_coef", "0")])["kl_coef"]   # --set wins
    '0.0'
    >>> "kl_coef" in run_settings("compressibility", "ddpo_is", [])   # the preset's (the default, 0)
    False
    """
    from diffusion_mdp.agents import PRESETS

    cell = CELL_SETTINGS.get((task, method), {}) if cell_settings is None else cell_settings
    merged = {**PRESETS["tiny-shapes"], **cell, **dict(overrides)}
    return settings_text({key: value for key, value in merged.items() if key not in NOT_SETTINGS})


def record_settings(record: dict[str, Any], overrides: Sequence[Sequence[str]]) -> dict[str, str]:
    """The settings a finished run ran with: its record's, or for a record older than that field (written before
    any cell had settings of its own) the preset's with the budget's overrides."""
    if "settings" in record:
        return dict(record["settings"])
    return run_settings(record["task"], record["method"], overrides, {})


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
def run_name(task: str, method: str, seed: int) -> str:
    """Folder name of one run, ``<task>-<method>-s<seed>``."""
    return f"{task}-{method}-s{seed}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and ``os.replace``: an interrupted write never corrupts the index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: parallel shards never share one
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


PER_RUN_KEYS: tuple[str, ...] = ("num_epochs", "samples_per_epoch", "num_steps", "trace_every", "overrides")


def per_run_budget(budget: dict[str, Any]) -> dict[str, Any]:
    """The fields of a budget (as saved in an index) that make two runs comparable: all but the grid's extent."""
    per_run = {k: budget.get(k, []) for k in PER_RUN_KEYS}
    per_run["overrides"] = [list(kv) for kv in per_run["overrides"]]
    return per_run


def load_index(out: Path, budget: Budget) -> dict[str, Any]:
    """The results index of ``out``; refuses one written with a different per-run budget.

    Raises:
        SystemExit: The folder holds runs of another epoch/sample/step budget (they are not comparable).
    """
    index = read_json(out / "results.json", None)
    per_run = per_run_budget(asdict(budget))
    if index is None:
        return {"format": INDEX_FORMAT, "budget": asdict(budget), "runs": {}}
    saved = per_run_budget(index["budget"])
    if saved != per_run:
        raise SystemExit(
            f"{out}/results.json was written with a different per-run budget {saved}; this invocation has "
            f"{per_run}. Use another --out, or the same budget flags to continue that grid."
        )
    # More tasks, methods or seeds may be added to a grid (--quick is a subset of the full grid): the union.
    merged = index["budget"]
    merged["mode"] = budget.mode
    for key in ("tasks", "methods", "seeds"):
        merged[key] = list(dict.fromkeys([*merged[key], *getattr(budget, key)]))
    return index



def collect_records(out: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Add every finished run's ``<run>/record.json`` to the index (other shards' runs included).

    Raises:
        SystemExit: A finished run ran with other settings than its cell runs with now (its results would pass
            as this grid's); the message names the difference and the fix.
    """
    overrides = index["budget"].get("overrides", [])
    for path in sorted((out / "runs").glob("*/record.json")):
        record = json.loads(path.read_text())
        ran = record_settings(record, overrides)
        wanted = run_settings(record["task"], record["method"], overrides)
        if ran != wanted:
            raise SystemExit(
                f"{path.parent} ran with other settings than its cell's ({settings_difference(ran, wanted)}): "
                "delete that folder to run it again, or use another --out"
            )
        index["runs"][path.parent.name] = record
    return index


def import_published(source: Path, out: Path, budget: Budget) -> list[str]:
    """Seed ``out`` with the finished runs of a published grid, so a fresh checkout only runs what is missing.

    ``runs/`` is not in git, but ``--publish`` writes every run's record to ``<publish>/<mode>/results.json``
    and the images the sample grids show to ``<publish>/<mode>/runs/``. Importing writes each published run's
    ``<out>/runs/<name>/record.json`` (tagged ``imported_from``) and copies its images, exactly what a finished
    run leaves behind except its checkpoint; runs ``out`` already finished are kept, not overwritten.

    Args:
        source: A published folder (``docs/results/full``) or its ``results.json``.
        out: The grid's output folder.
        budget: The invocation's budget; the published one must have the same per-run budget.

    Returns:
        Names of the imported runs.

    Raises:
        SystemExit: ``source`` has no index, or its runs were made with another per-run budget.
    """
    folder = source.parent if source.suffix == ".json" else source
    published = read_json(folder / "results.json", None)
    if published is None:
        raise SystemExit(f"--import: {folder}/results.json does not exist (expected a folder written by --publish)")
    theirs, ours = per_run_budget(published["budget"]), per_run_budget(asdict(budget))
    if theirs != ours:
        raise SystemExit(
            f"--import: {folder} was made with the per-run budget {theirs}, this invocation has {ours}; its runs "
            "are not comparable with this grid's."
        )
    imported = []
    for name, record in published["runs"].items():
        run_dir = out / "runs" / name
        if record.get("status") != "done" or (run_dir / "record.json").is_file():
            continue
        ran = record_settings(record, published["budget"]["overrides"])
        wanted = run_settings(record["task"], record["method"], budget.overrides)
        if ran != wanted:
            print(f"[reproduce] {name} of {folder}: not imported, it ran with other settings than its cell's "
                  f"({settings_difference(ran, wanted)}); it runs again", flush=True)  # fmt: skip
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        for image_file in sorted((folder / "runs" / name).glob("eval_images_epoch*.npz")):
            shutil.copy2(image_file, run_dir / image_file.name)
        origin = record.get("imported_from", str(folder))  # an import of an import names the first source
        write_json_atomic(run_dir / "record.json", {**record, "settings": ran, "imported_from": origin})
        imported.append(name)
    return imported
