"""Reproduce DDPO's comparative findings on tiny-shapes: a results table and plots anyone can regenerate.

A thin driver over :func:`diffusion_mdp.agents.train` / :class:`~diffusion_mdp.agents.TrainConfig`: for each
(task, method, seed) it trains one run from the ``tiny-shapes`` preset, then measures the run on fixed
noise (η = 0, the agents' own :meth:`~diffusion_mdp.agents.DiffusionAgent.evaluate`) on the task's
training prompts, on ``shapes_train`` and on ``shapes_heldout`` (unseen colour–shape pairs), every
``trace_every`` epochs. Each measurement scores the same images with the task's reward, with
``prompt_alignment`` (soft attribute match) and with ``strict_alignment`` (captioner accuracy: count,
colour and shape all right), so over-optimisation (reward up, fidelity down) shows up in the trace.

Tasks (the paper's, in miniature): ``compressibility`` / ``incompressibility`` (JPEG size, prompts
``shapes_train``) and ``alignment`` (``prompt_alignment``, the captioner standing in for LLaVA + BERTScore,
prompts ``shapes_counting``). Methods: ``ddpo_is``, ``ddpo_sf``, ``rwr``, ``sparse_rwr``, all with the same
samples per epoch × epochs, i.e. the same number of reward queries (evaluation queries are not counted).

Resuming: every run lives in ``<out>/runs/<task>-<method>-s<seed>/`` with the agents' checkpoint, and
``<out>/results.json`` indexes the finished runs. Rerunning the same command skips finished runs and
continues an interrupted one through the agents' exact resume (training proceeds in segments of
``trace_every`` epochs: ``resume_config(run, {"num_epochs": next})`` + ``train(resume=True)``; with constant
schedules a segmented run computes exactly what an uninterrupted one does).

Outputs in ``<out>/``: ``results.md`` (final reward table with queries-to-threshold, generalisation table,
over-optimisation table), ``reward_vs_queries.png`` (mean ± std over seeds), ``grid_<task>.png`` (base
model and each method on the same noise), ``overoptimisation.png``; ``--publish DIR`` copies them to
``DIR/<mode>/``.

    python benchmarks/reproduce.py --quick                               # ≤ 15 min on 2 cores
    python benchmarks/reproduce.py                                       # the full grid (resumable)
    python benchmarks/reproduce.py --quick --publish docs/results        # and copy the figures
    python benchmarks/reproduce.py --report-only --out runs/reproduce/full   # tables/plots from the index
    python benchmarks/reproduce.py --import docs/results/full --publish docs/results
                                        # a fresh checkout: take the published runs, run only the missing ones
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

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


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------
def run_config(budget: Budget, task: str, method: str, seed: int, out: Path, model: str, threads: int) -> Any:
    """The run's :class:`TrainConfig`: the ``tiny-shapes`` preset with the task, method, seed and budget."""
    from diffusion_mdp.agents import PRESETS, TrainConfig

    spec = TASKS[task]
    values: dict[str, Any] = {
        **PRESETS["tiny-shapes"],
        "eval_num_samples": budget.eval_samples,
        "name": run_name(task, method, seed),
        "output_dir": str(out / "runs"),
        "model": model,
        "algorithm": method,
        "reward": spec.reward,
        "prompts": spec.prompts,
        "eval_prompts": HELDOUT_SET,
        "seed": seed,
        "num_epochs": budget.num_epochs,
        "samples_per_epoch": budget.samples_per_epoch,
        "eval_every": budget.trace_every,
        "save_every": min(2, budget.trace_every),
        "image_every": budget.num_epochs,
        "num_threads": threads,
        "progress_bar": False,
        "log_formats": "csv",
    }
    if budget.num_steps:
        values["num_steps"] = budget.num_steps
    values.update(dict(budget.overrides))  # strings: TrainConfig.from_dict coerces them strictly
    return TrainConfig.from_dict(values).validate()


@functools.cache
def _score_fn(name: str) -> Any:
    from diffusion_mdp.rewards import make_reward

    return make_reward(name)


def measure(agent: Any, sets: Sequence[str], num_samples: int, task_reward: str) -> tuple[dict[str, Any], Any]:
    """Score the agent on each prompt set (fixed noise, η = 0): task reward, soft and strict alignment.

    Returns:
        ``{set: {"reward", "alignment", "strict"}}`` means, and the images of the first set (for grids).
    """
    from diffusion_mdp.mdp import score_images
    from diffusion_mdp.prompts import load_prompts

    scores: dict[str, Any] = {}
    first_images = None
    saved = agent.eval_prompts
    try:
        for name in sets:
            prompt_set = load_prompts(name)
            agent.eval_prompts = prompt_set  # evaluate() renders the agent's eval prompts from seeded noise
            result = agent.evaluate(num_samples)
            lookup = dict(zip(prompt_set.prompts, prompt_set.metadata, strict=True))
            metadata = [lookup[p] for p in result["prompts"]]
            images, prompts = result["images"], result["prompts"]
            entry: dict[str, float] = {}
            rewards = {"reward": task_reward, "alignment": "prompt_alignment", "strict": "strict_alignment"}
            for key, reward in rewards.items():
                entry[key] = float(np.mean(score_images(_score_fn(reward), reward, images, prompts, metadata)[0]))
            scores[name] = entry
            if first_images is None:
                first_images = {"images": images, "prompts": prompts, "rewards": result["rewards"]}
    finally:
        agent.eval_prompts = saved
    return scores, first_images


def execute_run(budget: Budget, task: str, method: str, seed: int, out: Path, model: str, threads: int) -> dict:
    """Train (or continue) one run segment by segment, measuring it at every segment end; returns its record.

    The trace and the accumulated wall time live in ``<run>/reproduce_trace.json``, written after each
    segment's checkpoint, so a run killed at any point continues from its last checkpoint.
    """
    import torch

    from diffusion_mdp.agents import make_agent, resume_config, train

    config = run_config(budget, task, method, seed, out, model, threads)
    run_dir = config.run_dir
    spec = TASKS[task]
    sets = list(dict.fromkeys([spec.prompts, SEEN_SET, HELDOUT_SET]))
    state_path = run_dir / "reproduce_trace.json"
    state = read_json(state_path, {"wall_s": 0.0, "trace": []})
    checkpoint = run_dir / "checkpoints" / "last.pt"
    start_epoch = int(torch.load(checkpoint, weights_only=False)["epoch"]) if checkpoint.is_file() else 0
    done = {entry["epoch"] for entry in state["trace"]}
    targets = sorted({*range(budget.trace_every, budget.num_epochs + 1, budget.trace_every), budget.num_epochs})
    if 0 not in done:
        # The pre-trained model: a fresh agent before any update (LoRA or full fine-tuning alike).
        t0 = time.perf_counter()
        scores, images = measure(make_agent(config), sets, budget.eval_samples, spec.reward)
        run_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(run_dir / "eval_images_epoch0000.npz", **images)
        state["trace"].insert(0, {"epoch": 0, "queries": 0, "scores": scores})
        state["wall_s"] += time.perf_counter() - t0
        done.add(0)
    for target in targets:
        if target in done or target < start_epoch:
            continue  # measured already, or (killed between checkpoint and trace) no longer measurable
        t0 = time.perf_counter()
        overrides = {"num_epochs": target, "num_threads": threads, "progress_bar": False}
        if checkpoint.is_file():
            agent, _ = train(resume_config(run_dir, overrides), resume=True)
        else:
            agent, _ = train(config.replace(num_epochs=target))
        scores, images = measure(agent, sets, budget.eval_samples, spec.reward)
        if target == budget.num_epochs:
            np.savez_compressed(run_dir / f"eval_images_epoch{target:04d}.npz", **images)
        state["trace"].append({"epoch": target, "queries": target * budget.samples_per_epoch, "scores": scores})
        state["wall_s"] += time.perf_counter() - t0
        write_json_atomic(state_path, state)
        done.add(target)
        print(f"[reproduce] {config.name}: epoch {target}/{budget.num_epochs} {json.dumps(scores)}", flush=True)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "status": "done",
        "wall_s": round(state["wall_s"], 2),
        "queries": budget.queries_per_run,
        "curve": [
            {
                "epoch": h["epoch"],
                "queries": h["epoch"] * budget.samples_per_epoch,
                "reward_mean": h["reward_mean"],
                "reward_std": h["reward_std"],
            }
            for h in history
        ],
        "trace": state["trace"],
        "summary": read_json(run_dir / "summary.json", {}),
        "extra": {k: history[-1][k] for k in ("effective_samples", "clipfrac", "approx_kl") if k in history[-1]},
    }


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
def collect_records(out: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Add every finished run's ``<run>/record.json`` to the index (other shards' runs included)."""
    for path in sorted((out / "runs").glob("*/record.json")):
        index["runs"][path.parent.name] = json.loads(path.read_text())
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
        run_dir.mkdir(parents=True, exist_ok=True)
        for image_file in sorted((folder / "runs" / name).glob("eval_images_epoch*.npz")):
            shutil.copy2(image_file, run_dir / image_file.name)
        origin = record.get("imported_from", str(folder))  # an import of an import names the first source
        write_json_atomic(run_dir / "record.json", {**record, "imported_from": origin})
        imported.append(name)
    return imported


def run_grid(
    budget: Budget,
    out: Path,
    model: str,
    threads: int,
    time_limit_s: float = 0.0,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """Run every (task, method, seed) of ``budget`` not yet finished; returns the index.

    A run is finished when its ``<run>/record.json`` exists (written last, atomically); ``results.json``
    is the union of the records, so several processes (``shard``) can share one output folder.

    Args:
        budget: The grid and per-run budget.
        out: Output folder (runs, index, report).
        model: Model for every run (``tiny-shapes`` or a pipeline folder).
        threads: torch threads per run.
        time_limit_s: Start no new run after this many seconds (0: no limit); the grid continues next time.
        shard: ``(k, n)``: run only the runs at positions ≡ k (mod n) of :meth:`Budget.runs`.
    """
    out.mkdir(parents=True, exist_ok=True)
    index = collect_records(out, load_index(out, budget))
    write_json_atomic(out / "results.json", index)
    start = time.perf_counter()
    for position, (task, method, seed) in enumerate(budget.runs()):
        name = run_name(task, method, seed)
        if position % shard[1] != shard[0]:
            continue
        if index["runs"].get(name, {}).get("status") == "done":
            print(f"[reproduce] {name}: finished, skipped", flush=True)
            continue
        if time_limit_s and time.perf_counter() - start > time_limit_s:
            print(f"[reproduce] time limit reached before {name}; rerun the same command to continue", flush=True)
            break
        print(f"[reproduce] {name}: starting ({budget.queries_per_run} reward queries)", flush=True)
        record = execute_run(budget, task, method, seed, out, model, threads)
        write_json_atomic(out / "runs" / name / "record.json", record)
        index = collect_records(out, index)
        write_json_atomic(out / "results.json", index)
    return collect_records(out, index)


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
def _group(index: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in index["runs"].values():
        if record.get("status") == "done":
            groups.setdefault((record["task"], record["method"]), []).append(record)
    for records in groups.values():
        records.sort(key=lambda r: r["seed"])
    return groups


def _mean_std(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def thresholds(index: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per task: (initial reward, threshold) where threshold = start + half the best method's mean gain.

    The start is the mean first-epoch training reward over all runs of the task (every run starts from the
    same model), the gain is measured on the last-epoch training reward.
    """
    out: dict[str, tuple[float, float]] = {}
    groups = _group(index)
    for task in dict.fromkeys(t for t, _ in groups):
        firsts = [r["curve"][0]["reward_mean"] for (t, _), rs in groups.items() if t == task for r in rs]
        finals = [np.mean([r["curve"][-1]["reward_mean"] for r in rs]) for (t, _), rs in groups.items() if t == task]
        start = float(np.mean(firsts))
        # No method improved on average: there is no meaningful threshold (NaN: "not applicable").
        out[task] = (start, start + 0.5 * (max(finals) - start) if max(finals) > start else math.nan)
    return out


def queries_to_reach(record: dict[str, Any], threshold: float) -> int | None:
    """Reward queries after which a run's training-batch mean reward first reaches ``threshold``."""
    for point in record["curve"]:
        if point["reward_mean"] >= threshold:
            return int(point["queries"])
    return None


def results_table(index: dict[str, Any]) -> str:
    """Markdown: final training reward (mean ± std over seeds) and reward queries to the task's threshold."""
    groups = _group(index)
    marks = thresholds(index)
    lines = [
        "| task | method | seeds | reward at start | final reward (last epoch) | gain | held-out eval before → after "
        "| queries to threshold | wall s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task in (t for t in TASKS if t in marks):
        _, mark = marks[task]
        for method in METHODS:
            records = groups.get((task, method))
            if not records:
                continue
            first = [r["curve"][0]["reward_mean"] for r in records]
            final = [r["curve"][-1]["reward_mean"] for r in records]
            gain = [b - a for a, b in zip(first, final, strict=True)]
            before = [r["trace"][0]["scores"][HELDOUT_SET]["reward"] for r in records]
            after = [r["trace"][-1]["scores"][HELDOUT_SET]["reward"] for r in records]
            reached = [q for q in (queries_to_reach(r, mark) for r in records) if q is not None]
            if math.isnan(mark):
                reach = "n/a (no method gained)"
            elif reached:
                reach = f"{np.mean(reached):.0f} ({len(reached)}/{len(records)} seeds)"
            else:
                reach = f"not reached (0/{len(records)})"
            lines.append(
                f"| {TASKS[task].label} | {METHOD_LABELS[method]} | {len(records)} | {_mean_std(first)} | "
                f"{_mean_std(final)} | {_mean_std(gain)} | {_mean_std(before)} → {_mean_std(after)} | {reach} | "
                f"{np.mean([r['wall_s'] for r in records]):.0f} |"
            )
    notes = "; ".join(f"{TASKS[t].label}: {m:.3f}" for t, (_, m) in marks.items())
    lines.append("")
    lines.append(
        f"Threshold = start + half of the best method's mean gain ({notes}). Rewards are training-batch means "
        "(η = 1 samples, the reward queries themselves); the held-out column is η = 0 on fixed noise over "
        f"`{HELDOUT_SET}` (unseen colour–shape pairs)."
    )
    return "\n".join(lines)


def generalisation_table(index: dict[str, Any]) -> str:
    """Markdown: task reward before → after on the trained prompts, ``shapes_train`` and ``shapes_heldout``."""
    groups = _group(index)
    lines = [
        f"| task | method | trained prompts | `{SEEN_SET}` (seen pairs) | `{HELDOUT_SET}` (unseen pairs) "
        "| gain seen | gain unseen |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        spec = TASKS[task]
        for method in METHODS:
            records = groups.get((task, method))
            if not records:
                continue

            def before_after(name: str, records: list[dict[str, Any]] = records) -> tuple[list[float], list[float]]:
                return (
                    [r["trace"][0]["scores"][name]["reward"] for r in records],
                    [r["trace"][-1]["scores"][name]["reward"] for r in records],
                )

            cells = []
            for name in (spec.prompts, SEEN_SET, HELDOUT_SET):
                before, after = before_after(name)
                cells.append(f"{_mean_std(before)} → {_mean_std(after)}")
            gains = []
            for name in (SEEN_SET, HELDOUT_SET):
                before, after = before_after(name)
                gains.append(_mean_std([b - a for a, b in zip(before, after, strict=True)]))
            trained = cells[0] if spec.prompts not in (SEEN_SET, HELDOUT_SET) else "(= seen)"
            lines.append(
                f"| {spec.label} | {METHOD_LABELS[method]} | {trained} | {cells[1]} | {cells[2]} | {gains[0]} | "
                f"{gains[1]} |"
            )
    lines.append("")
    lines.append(
        "Task reward of η = 0 samples from fixed noise (the same noise and prompts before and after), mean ± std "
        "over seeds; 'before' is the pre-trained model (before any update)."
    )
    return "\n".join(lines)


def overoptimisation_table(index: dict[str, Any]) -> str:
    """Markdown: task reward vs captioner accuracy (strict alignment) on ``shapes_train``, before and after."""
    groups = _group(index)
    lines = [
        "| task | method | task reward before → after | strict alignment before → after "
        "| soft alignment before → after |",
        "|---|---|---|---|---|",
    ]
    for task in TASKS:
        for method in METHODS:
            records = groups.get((task, method))
            if not records:
                continue
            cells = []
            for key in ("reward", "strict", "alignment"):
                before = [r["trace"][0]["scores"][SEEN_SET][key] for r in records]
                after = [r["trace"][-1]["scores"][SEEN_SET][key] for r in records]
                cells.append(f"{_mean_std(before)} → {_mean_std(after)}")
            lines.append(f"| {TASKS[task].label} | {METHOD_LABELS[method]} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(
        f"On `{SEEN_SET}`, η = 0, fixed noise. Strict alignment = fraction of images whose count, colour and shape "
        "the captioner reads as the prompt's (captioner accuracy against the prompt)."
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reward_curves(index: dict[str, Any], path: Path) -> Path:
    """Training reward vs reward queries, mean ± std over seeds, one panel per task."""
    plt = _plt()
    groups = _group(index)
    tasks = [t for t in TASKS if any(k[0] == t for k in groups)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for method in METHODS:
            records = groups.get((task, method))
            if not records:
                continue
            length = min(len(r["curve"]) for r in records)
            queries = np.array([p["queries"] for p in records[0]["curve"][:length]])
            values = np.array([[p["reward_mean"] for p in r["curve"][:length]] for r in records])
            mean, std = values.mean(0), values.std(0)
            label = f"{METHOD_LABELS[method]} (n={len(records)})"
            ax.plot(queries, mean, color=METHOD_COLOURS[method], label=label)
            if len(records) > 1:
                ax.fill_between(queries, mean - std, mean + std, color=METHOD_COLOURS[method], alpha=0.2)
        ax.set_title(TASKS[task].label)
        ax.set_xlabel("reward queries")
        ax.set_ylabel("training reward (batch mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_overoptimisation(index: dict[str, Any], path: Path) -> Path:
    """Task reward (top) and captioner accuracy (bottom) on ``shapes_train`` over training, per method."""
    plt = _plt()
    groups = _group(index)
    tasks = [t for t in ("incompressibility", "compressibility", "alignment") if any(k[0] == t for k in groups)]
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.6 * len(tasks), 6.4), squeeze=False, sharex="col")
    for col, task in enumerate(tasks):
        for method in METHODS:
            records = groups.get((task, method))
            if not records:
                continue
            length = min(len(r["trace"]) for r in records)
            queries = np.array([p["queries"] for p in records[0]["trace"][:length]])
            for row, key in enumerate(("reward", "strict")):
                values = np.array([[p["scores"][SEEN_SET][key] for p in r["trace"][:length]] for r in records])
                mean, std = values.mean(0), values.std(0)
                ax = axes[row][col]
                ax.plot(queries, mean, marker="o", color=METHOD_COLOURS[method], label=METHOD_LABELS[method])
                if len(records) > 1:
                    ax.fill_between(queries, mean - std, mean + std, color=METHOD_COLOURS[method], alpha=0.15)
        axes[0][col].set_title(TASKS[task].label)
        axes[0][col].set_ylabel("task reward (η = 0, shapes_train)")
        axes[1][col].set_ylabel("captioner accuracy (strict alignment)")
        axes[1][col].set_xlabel("reward queries")
        for row in range(2):
            axes[row][col].grid(alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.suptitle("Over-optimisation: the reward goes up, does the picture still match the prompt?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grid_sources(index: dict[str, Any], out: Path) -> dict[str, list[tuple[str, Path]]]:
    """Per task, the image files its sample grid shows: ``[("base", epoch-0 file), (method label, final file), ...]``.

    Each method shows its lowest seed whose final images exist (an imported run may come without them); the
    base row is the first shown run's epoch-0 images (every run starts from the same model on the same noise).
    """
    groups = _group(index)
    sources: dict[str, list[tuple[str, Path]]] = {}
    for task in TASKS:
        rows: list[tuple[str, Path]] = []
        for method in METHODS:
            for record in groups.get((task, method), []):
                run_dir = out / "runs" / run_name(task, method, record["seed"])
                final = run_dir / f"eval_images_epoch{record['trace'][-1]['epoch']:04d}.npz"
                if not final.is_file():
                    continue
                if not rows and (run_dir / "eval_images_epoch0000.npz").is_file():
                    rows.append(("base", run_dir / "eval_images_epoch0000.npz"))
                rows.append((METHOD_LABELS[method], final))
                break
        if rows:
            sources[task] = rows
    return sources


def save_method_grids(index: dict[str, Any], out: Path, per_row: int = 8) -> list[Path]:
    """Per task, one grid: the base model then each method (lowest seed), on the same noise and prompts."""
    from diffusion_mdp.viz import image_grid

    paths = []
    for task, sources in grid_sources(index, out).items():
        rows = [(label, dict(np.load(path))) for label, path in sources]
        if not rows:
            continue
        images, captions = [], []
        for label, data in rows:
            count = min(per_row, len(data["images"]))
            images.extend(data["images"][:count])
            captions.extend(
                f"{label} r={r:.2f} {p}" for p, r in zip(data["prompts"][:count], data["rewards"][:count], strict=True)
            )
        scale = max(1, 128 // images[0].shape[1])  # ~128 px tiles: room for a two-line caption
        grid = image_grid(np.stack(images), captions, columns=per_row, scale=scale, caption_lines=2)
        path = out / f"grid_{task}.png"
        grid.save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def imported_note(index: dict[str, Any]) -> list[str]:
    """Report lines naming the runs taken from an earlier publication (``--import``), if any."""
    imported = sorted(name for name, r in index["runs"].items() if r.get("status") == "done" and "imported_from" in r)
    if not imported:
        return []
    sources = sorted({index["runs"][name]["imported_from"] for name in imported})
    return [
        f"{len(imported)} of these runs were imported (`--import`) from {', '.join(f'`{s}`' for s in sources)}, "
        "i.e. run by an earlier invocation of the same budget; their wall times are those of the machine that "
        f"ran them: {', '.join(imported)}.",
        "",
    ]


def write_report(index: dict[str, Any], out: Path, command: str) -> list[Path]:
    """Write ``results.md`` and every figure into ``out``; returns their paths, the Markdown first."""
    groups = _group(index)
    if not groups:
        raise SystemExit(f"{out}: no finished runs to report")
    budget = index["budget"]
    figures = [
        plot_reward_curves(index, out / "reward_vs_queries.png"),
        plot_overoptimisation(index, out / "overoptimisation.png"),
        *save_method_grids(index, out),
    ]
    done = sum(len(v) for v in groups.values())
    planned = len(budget["tasks"]) * len(budget["methods"]) * len(budget["seeds"])
    total_wall = sum(r["wall_s"] for rs in groups.values() for r in rs)
    text = [
        f"# tiny-shapes reproduction: {budget['mode']} budget",
        "",
        f"Command: `{command}`",
        "",
        f"Runs finished: {done} of {planned} planned (tasks {', '.join(budget['tasks'])}; methods "
        f"{', '.join(budget['methods'])}; seeds {', '.join(map(str, budget['seeds']))}). Each run: "
        f"{budget['num_epochs']} epochs × {budget['samples_per_epoch']} samples = "
        f"{budget['num_epochs'] * budget['samples_per_epoch']} reward queries, the `tiny-shapes` preset with "
        f"{', '.join(f'{k}={v}' for k, v in budget['overrides']) or 'no overrides'}. Training + measurement "
        f"wall time summed over runs: {total_wall / 60:.1f} min (parallel processes overlap).",
        "",
        *imported_note(index),
        "## Final reward and sample efficiency",
        "",
        results_table(index),
        "",
        "![reward vs queries](reward_vs_queries.png)",
        "",
        "## Generalisation to unseen colour–shape pairs",
        "",
        generalisation_table(index),
        "",
        "## Over-optimisation",
        "",
        overoptimisation_table(index),
        "",
        "![over-optimisation](overoptimisation.png)",
        "",
        "## Samples",
        "",
        *[f"![{p.stem}]({p.name})" for p in figures if p.name.startswith("grid_")],
        "",
    ]
    path = out / "results.md"
    path.write_text("\n".join(text))
    return [path, *figures]


def publish(
    files: Sequence[Path],
    target: Path,
    mode: str,
    index: dict[str, Any] | None = None,
    run_files: Sequence[Path] = (),
) -> Path:
    """Copy a report's files (:func:`write_report`'s, not the runs) to ``target/<mode>/``, replacing the last ones.

    The previous ``results.md``, ``results.json``, figures and ``runs/`` in the target are removed first, so a
    figure of a task the new report does not have cannot linger beside it. ``index`` (the report's runs), if
    given, is written as ``results.json``; ``run_files`` (files inside ``<out>/runs/<name>/``, e.g. the images
    the sample grids show) go to ``target/<mode>/runs/<name>/``. Together they let :func:`import_published`
    rebuild the grid's finished runs, and this report, in a fresh checkout.
    """
    dest = target / mode
    dest.mkdir(parents=True, exist_ok=True)
    for stale in [dest / "results.md", dest / "results.json", *dest.glob("*.png")]:
        stale.unlink(missing_ok=True)
    shutil.rmtree(dest / "runs", ignore_errors=True)
    for path in files:
        shutil.copy2(path, dest / path.name)
    for path in run_files:
        (dest / "runs" / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / "runs" / path.parent.name / path.name)
    if index is not None:
        write_json_atomic(dest / "results.json", index)
    return dest


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"quick mode: {', '.join(QUICK.methods)} on {', '.join(QUICK.tasks)} × seeds "
        f"{QUICK.seeds}, {QUICK.num_epochs} epochs × {QUICK.samples_per_epoch} samples "
        "(≤ 15 min on 2 cores)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/reproduce for --quick and the full grid, which share it; "
        "runs/reproduce-<label> for a changed per-run budget)",
    )
    p.add_argument("--publish", type=Path, default=None, help="copy results.md and figures to PUBLISH/<mode>/")
    p.add_argument(
        "--import",
        dest="import_from",
        type=Path,
        default=None,
        metavar="PUBLISHED",
        help="first take the finished runs of a published grid (e.g. docs/results/full) into --out, so only "
        "the missing runs run",
    )
    p.add_argument("--model", default="tiny-shapes", help="model of every run (a pipeline folder for tests)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), help="override the budget's tasks")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="override the budget's methods")
    p.add_argument("--seeds", nargs="+", type=int, help="override the budget's seeds")
    p.add_argument("--epochs", type=int, help="override epochs per run")
    p.add_argument("--samples-per-epoch", type=int, help="override samples per epoch (multiple of 16)")
    p.add_argument("--trace-every", type=int, help="override the measurement interval (epochs)")
    p.add_argument("--eval-samples", type=int, help="override images per prompt set per measurement")
    p.add_argument("--num-steps", type=int, help="override denoising steps T")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainConfig field for every run (repeatable), e.g. --set rwr_beta=0.1",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="minutes after which no new run starts (0: none); rerun to continue",
    )
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="K/N",
        help="run only every N-th run starting at K (parallel processes sharing --out; 1 thread each is best)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="parallel processes, each a shard of the grid with 1 thread (default: 2, or 1 on one core); "
        "1 runs in this process with --threads",
    )
    p.add_argument(
        "--label",
        default=None,
        help="name of a changed per-run budget (default 'custom'): its default --out and its --publish folder",
    )
    p.add_argument("--no-report", action="store_true", help="run only; no tables or figures (used by --jobs)")
    p.add_argument("--report-only", action="store_true", help="only rebuild tables and figures from the index")
    return p.parse_args(argv)


def budget_from_args(args: argparse.Namespace) -> Budget:
    """The mode's budget with the overrides applied (any override of the per-run budget makes it ``custom``)."""
    budget = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    for key, attr in (("tasks", "tasks"), ("methods", "methods"), ("seeds", "seeds")):
        if getattr(args, key):
            changes[attr] = tuple(getattr(args, key))
    for key, attr in (
        ("epochs", "num_epochs"),
        ("samples_per_epoch", "samples_per_epoch"),
        ("trace_every", "trace_every"),
        ("eval_samples", "eval_samples"),
        ("num_steps", "num_steps"),
    ):
        if getattr(args, key) is not None:
            changes[attr] = getattr(args, key)
    if args.overrides:
        pairs = [item.split("=", 1) for item in args.overrides]
        if any(len(pair) != 2 for pair in pairs):
            raise SystemExit(f"--set takes KEY=VALUE, got {args.overrides}")
        changes["overrides"] = (*budget.overrides, *((k.strip(), v.strip()) for k, v in pairs))
    per_run_keys = (*PER_RUN_KEYS, "eval_samples")  # what makes runs comparable, and how they are measured
    if args.label is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.label):
        raise SystemExit(f"--label {args.label!r}: use letters, digits, '-', '_' or '.' (it names folders)")
    if any(k in changes for k in per_run_keys):
        changes["mode"] = args.label or "custom"
    elif args.label:
        raise SystemExit(
            f"--label {args.label!r} names a changed per-run budget (--epochs, --set, ...); the "
            f"{budget.mode} budget keeps its name so its runs stay one grid"
        )
    budget = replace(budget, **changes)
    budget = replace(budget, trace_every=max(1, min(budget.trace_every, budget.num_epochs)))
    return budget


def select(index: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """The index restricted to ``budget``'s grid (a folder may hold more, e.g. the full grid around --quick)."""
    names = {run_name(*run) for run in budget.runs()}
    runs = {k: v for k, v in index["runs"].items() if k in names}
    return {**index, "budget": asdict(budget), "runs": runs}


def run_jobs(argv: list[str], jobs: int, out: Path) -> None:
    """Run the grid in ``jobs`` processes (``--shard k/jobs``, 1 thread each) sharing ``out``; wait for all."""
    import subprocess

    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                *argv,
                "--out",
                str(out),
                "--jobs",
                "1",
                "--shard",
                f"{k}/{jobs}",
                "--threads",
                "1",
                "--no-report",
            ]
        )
        for k in range(jobs)
    ]
    codes = [child.wait() for child in children]
    if any(codes):
        raise SystemExit(f"a shard failed (exit codes {codes}); rerun the same command to continue")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or continue) the grid, then write the report; returns the results index."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    budget = budget_from_args(args)
    default_out = "runs/reproduce" if budget.mode in ("full", "quick") else f"runs/reproduce-{budget.mode}"
    out = args.out or Path(default_out)
    command = "python benchmarks/reproduce.py " + " ".join(argv)
    t0 = time.perf_counter()
    if args.import_from is not None:
        imported = import_published(args.import_from, out, budget)
        print(f"[reproduce] imported {len(imported)} finished runs from {args.import_from}", flush=True)
    if args.report_only:
        index = read_json(out / "results.json", None)
        if index is None:
            raise SystemExit(f"{out}/results.json does not exist: run the grid first")
        index = collect_records(out, index)
    elif args.jobs > 1:
        load_index(out, budget)  # refuse a mismatched folder before starting any process
        run_jobs(argv, args.jobs, out)
        index = collect_records(out, load_index(out, budget))
    else:
        k, n = (int(x) for x in args.shard.split("/"))
        index = run_grid(budget, out, args.model, args.threads, args.time_limit * 60, shard=(k, n))
    if not args.report_only:
        print(f"[reproduce] grid pass took {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    if args.no_report:
        return index
    index = select(index, budget)
    report = write_report(index, out, command.strip())
    print(f"[reproduce] report: {report[0]}", flush=True)
    if args.publish:
        images = [path for rows in grid_sources(index, out).values() for _, path in rows]
        dest = publish(report, args.publish, index["budget"]["mode"], index, run_files=images)
        print(f"[reproduce] published to {dest}", flush=True)
    return index


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
