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
The package: ``grid.py`` (tasks, budgets, the results index), ``measurement.py`` (one run trained and
measured; the grid's missing runs), ``report.py`` (tables, figures, ``results.md``, publishing), ``cli.py``
(the command line). ``benchmarks/reproduce.py`` launches it; ``python benchmarks/reproduce`` does too.
"""

from .cli import DESCRIPTION, budget_from_args, main, parse_args, run_jobs, select
from .grid import (
    CELL_SETTINGS,
    FULL,
    HELDOUT_SET,
    INDEX_FORMAT,
    KL_COEF,
    METHOD_COLOURS,
    METHOD_LABELS,
    METHODS,
    NOT_SETTINGS,
    PER_RUN_KEYS,
    QUICK,
    SEEN_SET,
    TASKS,
    Budget,
    Task,
    collect_records,
    import_published,
    load_index,
    per_run_budget,
    read_json,
    record_settings,
    run_name,
    run_settings,
    settings_difference,
    settings_text,
    write_json_atomic,
)
from .measurement import execute_run, measure, run_config, run_grid
from .report import (
    generalisation_table,
    grid_sources,
    imported_note,
    overoptimisation_table,
    plot_overoptimisation,
    plot_reward_curves,
    publish,
    queries_to_reach,
    results_table,
    save_method_grids,
    thresholds,
    write_report,
)

__all__ = [
    "CELL_SETTINGS",
    "DESCRIPTION",
    "FULL",
    "HELDOUT_SET",
    "INDEX_FORMAT",
    "KL_COEF",
    "METHODS",
    "METHOD_COLOURS",
    "METHOD_LABELS",
    "NOT_SETTINGS",
    "PER_RUN_KEYS",
    "QUICK",
    "SEEN_SET",
    "TASKS",
    "Budget",
    "Task",
    "budget_from_args",
    "collect_records",
    "execute_run",
    "generalisation_table",
    "grid_sources",
    "import_published",
    "imported_note",
    "load_index",
    "main",
    "measure",
    "overoptimisation_table",
    "parse_args",
    "per_run_budget",
    "plot_overoptimisation",
    "plot_reward_curves",
    "publish",
    "queries_to_reach",
    "read_json",
    "record_settings",
    "results_table",
    "run_config",
    "run_grid",
    "run_jobs",
    "run_name",
    "run_settings",
    "save_method_grids",
    "select",
    "settings_difference",
    "settings_text",
    "thresholds",
    "write_json_atomic",
    "write_report",
]
