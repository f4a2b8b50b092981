"""Run every ``>>>`` example of the package, including diffusion_mdp.agents and diffusion_mdp.envs."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import diffusion_mdp
import diffusion_mdp.agents
import diffusion_mdp.envs

# agents/ and envs/ live outside diffusion_mdp/ in the repository (an editable install maps them), so each
# package's own __path__ is walked.
MODULES = sorted(
    {
        info.name
        for package in (diffusion_mdp, diffusion_mdp.agents, diffusion_mdp.envs)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")
        if not info.name.endswith("__main__")
    }
    | {"diffusion_mdp", "diffusion_mdp.agents", "diffusion_mdp.envs"}
)


def test_walk_finds_the_subpackages() -> None:
    assert "diffusion_mdp.envs.vector" in MODULES and "diffusion_mdp.ddim" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
