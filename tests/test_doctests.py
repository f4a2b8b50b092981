"""Run every ``>>>`` example of the package, including diffusion_mdp.agents and diffusion_mdp.envs.

Only the modules whose source holds an example are collected (found by reading the files, so a new example
is picked up without editing this list), and each of them must run at least one: a test here can fail.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import diffusion_mdp
import diffusion_mdp.agents
import diffusion_mdp.envs


def modules_with_examples() -> list[str]:
    """Every module of the three packages whose source file contains ``>>>``, sorted."""
    # agents/ and envs/ live outside diffusion_mdp/ in the repository (an editable install maps them), so each
    # package's own __path__ is walked.
    names = {
        info.name
        for package in (diffusion_mdp, diffusion_mdp.agents, diffusion_mdp.envs)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")
        if not info.name.endswith("__main__")
    } | {"diffusion_mdp", "diffusion_mdp.agents", "diffusion_mdp.envs"}
    found = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and ">>>" in Path(spec.origin).read_text(encoding="utf-8"):
            found.append(name)
    return sorted(found)


MODULES = modules_with_examples()

# The public API that a reader meets first: each must keep a runnable example.
REQUIRED = {
    "diffusion_mdp.ddim",
    "diffusion_mdp.prompts",
    "diffusion_mdp.rewards",
    "diffusion_mdp.agents.advantages",
    "diffusion_mdp.agents.buffer",
    "diffusion_mdp.agents.ddpo_is",
}


def test_the_public_api_has_examples() -> None:
    assert set(MODULES) >= REQUIRED, sorted(REQUIRED - set(MODULES))


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has '>>>' in its source but doctest found no example to run"
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
