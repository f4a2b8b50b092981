"""benchmarks/gpu_benchmark.py runs end to end at a tiny size on a CPU and reports every field of its table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import import_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_benchmark.py"


def test_tiny_gpu_benchmark_reports_every_field(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--tiny",
        "--device",
        "cpu",
        "--modes",
        "lora",
        "--precisions",
        "bf16",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fields = import_benchmark("gpu_benchmark").FIELDS
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["gradient_checkpointing"]) for r in rows] == [("lora", False), ("lora", True)]
    for row in rows:
        assert set(row) == set(fields)
        for key in ("sampling_images_per_s", "train_step_s", "training_s_per_epoch", "peak_memory_mib"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        # the extrapolated epoch is at least the training passes it is made of
        assert row["training_s_per_epoch"] >= 256 / 2 * 3 * row["train_step_s"] * (1 - 1e-9)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| lora")]
    assert len(table) == 2


if __name__ == "__main__":
    pytest.main([__file__])
