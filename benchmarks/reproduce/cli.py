"""The command line of the reproduction: ``python benchmarks/reproduce.py [options]`` (see the package's docstring).

:func:`main` runs (or continues) the grid, in this process or in ``--jobs`` shard processes, then writes the
report and, with ``--publish``, copies it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .grid import (
    FULL,
    METHODS,
    PER_RUN_KEYS,
    QUICK,
    TASKS,
    Budget,
    collect_records,
    import_published,
    load_index,
    read_json,
    run_name,
)
from .measurement import run_grid
from .report import grid_sources, publish, write_report

# The first paragraph of the package's docstring: what --help says the script does.
DESCRIPTION = "Reproduce DDPO's comparative findings on tiny-shapes: a results table and plots anyone can regenerate."
# What --jobs starts once per shard: the launcher of the documented command.
LAUNCHER = Path(__file__).resolve().parents[1] / "reproduce.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter)
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

    # The parent imported already: the shards only run.
    argv = [a for i, a in enumerate(argv) if a != "--import" and (i == 0 or argv[i - 1] != "--import")]
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(LAUNCHER),
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

