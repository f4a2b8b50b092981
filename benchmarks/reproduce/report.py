"""The report of a grid: tables, figures, ``results.md``, and publishing them.

Tables: final reward with queries-to-threshold, generalisation to unseen colour–shape pairs,
over-optimisation. Figures: reward vs queries (mean ± std over seeds), over-optimisation, and per task a grid
of the base model and each method on the same noise. :func:`publish` copies the report, the index and the
grids' images to ``<publish>/<mode>/``, from which :func:`~.grid.import_published` rebuilds the grid.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .grid import HELDOUT_SET, METHOD_COLOURS, METHOD_LABELS, METHODS, SEEN_SET, TASKS, run_name, write_json_atomic


def _group(index: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in index["runs"].values():
        if record.get("status") == "done":
            groups.setdefault((record["task"], record["method"]), []).append(record)
    for records in groups.values():
        records.sort(key=lambda r: r["seed"])
    return groups


def mean_std(values: Sequence[float], digits: int = 3) -> str:
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
                f"| {TASKS[task].label} | {METHOD_LABELS[method]} | {len(records)} | {mean_std(first)} | "
                f"{mean_std(final)} | {mean_std(gain)} | {mean_std(before)} → {mean_std(after)} | {reach} | "
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
                cells.append(f"{mean_std(before)} → {mean_std(after)}")
            gains = []
            for name in (SEEN_SET, HELDOUT_SET):
                before, after = before_after(name)
                gains.append(mean_std([b - a for a, b in zip(before, after, strict=True)]))
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
                cells.append(f"{mean_std(before)} → {mean_std(after)}")
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

