"""One run of the grid, trained segment by segment and measured after each; and the grid's missing runs.

:func:`execute_run` trains (or continues, through the agents' exact resume) one (task, method, seed) run in
segments of ``trace_every`` epochs and :func:`measure` scores it after each on fixed noise (η = 0) on three
prompt sets, with the task's reward, soft and strict alignment. :func:`run_grid` runs every run of a budget
not finished yet.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .grid import (
    CELL_SETTINGS,
    HELDOUT_SET,
    SEEN_SET,
    TASKS,
    Budget,
    collect_records,
    load_index,
    read_json,
    run_name,
    run_settings,
    write_json_atomic,
)


def run_config(budget: Budget, task: str, method: str, seed: int, out: Path, model: str, threads: int) -> Any:
    """The run's :class:`TrainConfig`: the ``tiny-shapes`` preset, the cell's :data:`~.grid.CELL_SETTINGS`, the
    task, method, seed and budget (its overrides last)."""
    from diffusion_mdp.agents import PRESETS, TrainConfig

    spec = TASKS[task]
    values: dict[str, Any] = {
        **PRESETS["tiny-shapes"],
        **CELL_SETTINGS.get((task, method), {}),
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
        "settings": run_settings(task, method, budget.overrides),
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

