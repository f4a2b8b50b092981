"""Reward functions r(x_0, c) and their registry.

A reward is any callable with the signature of :class:`RewardFn`:

    ``reward(images, prompts, metadata) -> (rewards, info)``

- ``images``: ``np.ndarray`` of dtype ``uint8`` and shape ``(B, H, W, 3)``, the decoded x_0.
- ``prompts``: ``list[str]`` of length ``B``, the prompts c.
- ``metadata``: ``list[dict]`` of length ``B``, what the prompt set knows about each prompt (for
  tiny-shapes: the colour, shape and count the prompt asks for).
- returns ``rewards``, a float ``np.ndarray`` of shape ``(B,)``, and ``info``, a dict of extra per-sample
  arrays (shape ``(B,)``) or scalars worth logging.

:func:`make_reward` turns what a user passes (a registered name, a callable, or a weighted dict of
several) into one such callable.

>>> import numpy as np
>>> reward = make_reward({"jpeg_compressibility": 1.0, "jpeg_incompressibility": 1.0})
>>> rewards, info = reward(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"], [{}, {}])
>>> rewards.tolist()  # the two terms cancel exactly
[0.0, 0.0]
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np


class RewardFn(Protocol):
    """What the environment calls at the end of an episode (see the module docstring)."""

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]: ...


class RewardError(RuntimeError):
    """The reward function raised, or returned something that is not N finite numbers."""


_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator registering a *factory* that builds a reward (``factory(**kwargs) -> RewardFn``).

    Factories let heavy rewards (a CLIP model, a captioner) load their weights only when asked for.
    """

    def decorator(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _REGISTRY:
            raise ValueError(f"a reward named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_rewards() -> list[str]:
    """Names accepted by :func:`make_reward`, sorted.

    >>> "jpeg_compressibility" in available_rewards()
    True
    """
    _import_builtin_rewards()
    return sorted(_REGISTRY)


def reward_factory(name: str) -> Callable[..., RewardFn]:
    """The factory registered as ``name`` (to inspect its arguments without building the reward).

    >>> import inspect
    >>> list(inspect.signature(reward_factory("shapes_geneval_graded")).parameters)
    ['attribute_weight']
    """
    _import_builtin_rewards()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available rewards: {', '.join(available_rewards())}")
    return _REGISTRY[name]


def make_reward(spec: str | RewardFn | Mapping[str, float], **kwargs: Any) -> RewardFn:
    """Build a reward from a name, a callable, or a ``{name: weight}`` dict.

    Args:
        spec: A registered name (see :func:`available_rewards`), the URL of a reward server
            (``"http://host:port"``, see ``diffusion_mdp.rewards.server``), a callable following :class:`RewardFn`,
            or a mapping from names to weights whose weighted sum is the reward (each term is also
            reported in ``info`` as ``"<name>"``).
        **kwargs: Passed to the factory of a named reward (e.g. ``device=``).

    Returns:
        The reward callable.

    Raises:
        ValueError: For an unknown name (the message lists the available ones) or an empty dict.
        TypeError: For anything else.

    >>> def brightness(images, prompts, metadata):
    ...     return images.reshape(len(images), -1).mean(axis=1) / 255.0, {}
    >>> make_reward(brightness) is brightness  # a callable is used as it is
    True
    >>> make_reward("no_such_reward")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown reward 'no_such_reward'; available rewards: ...
    """
    if isinstance(spec, str) and spec.startswith(("http://", "https://")):
        from diffusion_mdp.rewards.server import RemoteReward  # a reward server (python -m ...rewards.server)

        return RemoteReward(spec, **kwargs)
    if isinstance(spec, str):
        _import_builtin_rewards()
        if spec not in _REGISTRY:
            raise ValueError(
                f"unknown reward {spec!r}; available rewards: {', '.join(available_rewards())}. "
                "Pass one of these names, a callable (images, prompts, metadata) -> (rewards, info), "
                "or a dict {name: weight}."
            )
        return _REGISTRY[spec](**kwargs)
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("a weighted reward dict needs at least one {name: weight} entry")
        return WeightedSum({name: (make_reward(name, **kwargs), float(w)) for name, w in spec.items()})
    if callable(spec):
        return spec
    raise TypeError(f"reward must be a name, a callable or a {{name: weight}} dict, got {type(spec).__name__}")


class WeightedSum:
    """The weighted sum of several rewards; each term's raw value is kept in ``info[name]``."""

    def __init__(self, terms: Mapping[str, tuple[RewardFn, float]]) -> None:
        self.terms = dict(terms)

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        total = np.zeros(len(images), dtype=np.float64)
        info: dict[str, Any] = {}
        for name, (fn, weight) in self.terms.items():
            values, term_info = fn(images, prompts, metadata)
            values = np.asarray(values, dtype=np.float64)
            total += weight * values
            info[name] = values
            info.update({f"{name}/{key}": value for key, value in term_info.items()})
        return total, info


def _import_builtin_rewards() -> None:
    """Import the modules whose ``@register_reward`` decorators fill the registry."""
    from diffusion_mdp.rewards import aesthetic, alignment, hps, imagereward, jpeg, pickscore  # noqa: F401

    if importlib.util.find_spec("diffusion_mdp.rewards.shapes") is not None:  # tiny-shapes captioner rewards
        importlib.import_module("diffusion_mdp.rewards.shapes")
        importlib.import_module("diffusion_mdp.rewards.shapes_geneval")


__all__ = [
    "RewardError",
    "RewardFn",
    "WeightedSum",
    "available_rewards",
    "make_reward",
    "register_reward",
    "reward_factory",
]
