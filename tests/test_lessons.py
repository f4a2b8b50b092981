"""The course lessons (examples/lessons/) run end to end in smoke mode and write sensible outputs.

Each lesson runs in its own process (as a student runs it: ``python lessonN_*.py``) with
``LESSON_SMOKE=1`` and ``LESSON_OUT=<tmp>``. On the bundled tiny-shapes model when it is installed;
otherwise on the reference tiny pipeline with a JPEG reward (the captioner reads only tiny-shapes images).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from diffusion_mdp.models import bundled_model_path

LESSON_DIR = Path(__file__).resolve().parents[1] / "examples" / "lessons"
LESSONS = sorted(LESSON_DIR.glob("lesson[0-9]_*.py"))


def finite_numbers(value: Any) -> list[float]:
    """Every number in a JSON structure."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in finite_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in finite_numbers(v)]
    return []


@pytest.fixture(scope="module")
def lesson_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment variables of a smoke run (model fallback when tiny-shapes is not installed)."""
    env = {"LESSON_SMOKE": "1", "LESSON_THREADS": "2", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    if not (bundled_model_path() / "model_index.json").is_file():
        env.update(
            LESSON_MODEL=str(request.getfixturevalue("reference_pipeline")), LESSON_REWARD="jpeg_compressibility"
        )
    return env


def test_six_lessons_in_percent_format() -> None:
    assert [p.name.split("_")[0] for p in LESSONS] == [f"lesson{i}" for i in range(1, 7)]
    for path in LESSONS:
        text = path.read_text()
        assert text.startswith("# %% [markdown]") and text.count("# %%") >= 3, path.name
        exercises = text.split("## Exercises")[-1]
        assert "## Exercises" in text and 2 <= sum(f"# {i}. " in exercises for i in range(1, 5)) <= 3, path.name


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_smoke(path: Path, tmp_path: Path, lesson_env: dict[str, str]) -> None:
    env = {**os.environ, **lesson_env, "LESSON_OUT": str(tmp_path)}
    # The timeout only stops a hung lesson; how long a smoke run takes depends on the machine's load.
    proc = subprocess.run(
        [sys.executable, path.name], cwd=LESSON_DIR, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    number = path.name.split("_")[0].removeprefix("lesson")
    figures = list(tmp_path.glob(f"lesson{number}_*.png"))
    assert len(figures) == 1, f"expected one figure, got {figures}"
    with Image.open(figures[0]) as image:
        assert image.width > 200 and image.height > 150
    results = json.loads((tmp_path / f"lesson{number}.json").read_text())
    numbers = finite_numbers(results)
    assert numbers and all(math.isfinite(x) for x in numbers), results

    if number == "1":
        assert len(results["sigmas"]) == len(results["log_probs"]) >= 2
        assert results["sigmas"] == sorted(results["sigmas"], reverse=True)  # σ_t shrinks as t decreases
    if number == "3":
        # The sum log-ratio is D times the mean one.
        assert results["median_abs_log_ratio_sum"] == pytest.approx(
            results["D"] * results["median_abs_log_ratio_mean"], rel=1e-4
        )
    if number == "6":
        assert 0 <= results["share_between"] <= 1 and 0 <= results["r2_prompt"] <= 1
