"""Shared fixtures: the reference tiny pipeline, built once per test session (no downloads)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

# No test may reach a model hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (a script, not a package module), leaving ``sys.path`` as it was."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test, the session's setting restored after it.

    Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's spin-waiting makes
    2 threads several times slower than 1. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the reference tiny pipeline (ε-prediction), see ``diffusion_mdp.testing``."""
    from diffusion_mdp.testing import build_reference_tiny_pipeline

    return build_reference_tiny_pipeline(tmp_path_factory.mktemp("reference-tiny"))


@pytest.fixture(scope="session")
def reference_components(reference_pipeline: Path):
    """Loaded components of the reference tiny pipeline, shared (read-only!) by tests."""
    from diffusion_mdp.models import load_components

    return load_components(reference_pipeline)


PROMPTS = ["a red circle", "two blue squares", "three green triangles"]
