"""Prompt distributions p(c): the paper's prompt sets, any list, or any text file.

A :class:`PromptSet` is a fixed list of prompts with one metadata dict each (what a reward may need to
know about the prompt, e.g. the colour, shape and count a tiny-shapes prompt asks for). The environment
draws c ~ p(c) uniformly from it with its own seeded NumPy generator, so a seeded environment always sees
the same prompts.

>>> prompts = load_prompts("simple_animals")
>>> len(prompts), prompts.prompts[0]
(45, 'cat')
>>> load_prompts(["a red circle", "two blue squares"]).prompts
['a red circle', 'two blue squares']
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

# Printable characters a prompt may contain; also the charset of the environment's Text space.
PROMPT_CHARSET = "".join(chr(c) for c in range(32, 127))


@dataclass(frozen=True)
class PromptSet:
    """A finite prompt distribution (uniform over ``prompts``).

    Attributes:
        prompts: The prompts, in a fixed order (the index is the environment's ``prompt_id``).
        metadata: One dict per prompt, handed to the reward.
        name: A label for logs.
    """

    prompts: list[str]
    metadata: list[dict[str, Any]] = field(default_factory=list)
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError(f"prompt set {self.name!r} is empty: give at least one prompt")
        if not self.metadata:
            object.__setattr__(self, "metadata", [{} for _ in self.prompts])
        if len(self.metadata) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.metadata)} metadata dicts")
        for index, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
            if not prompt.strip():
                raise ValueError(
                    f"prompt {index} of prompt set {self.name!r} is empty: remove it (the empty prompt is "
                    "classifier-free guidance's unconditional branch, not a prompt to train on)"
                )
            bad = sorted(set(prompt) - set(PROMPT_CHARSET))
            if bad:
                raise ValueError(f"prompt {prompt!r} has characters outside printable ASCII: {bad}")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def max_length(self) -> int:
        """Length of the longest prompt (in characters)."""
        return max(len(p) for p in self.prompts)

    def sample(self, rng: np.random.Generator) -> int:
        """Draw a prompt index uniformly with ``rng``.

        >>> prompts = PromptSet(["a cat", "a dog"])
        >>> sorted({prompts.sample(np.random.default_rng(seed)) for seed in range(20)})
        [0, 1]
        """
        return int(rng.integers(len(self.prompts)))


_REGISTRY: dict[str, Callable[[], PromptSet]] = {}


def register_prompt_set(name: str) -> Callable[[Callable[[], PromptSet]], Callable[[], PromptSet]]:
    """Decorator registering a zero-argument factory of a :class:`PromptSet` under ``name``."""

    def decorator(factory: Callable[[], PromptSet]) -> Callable[[], PromptSet]:
        if name in _REGISTRY:
            raise ValueError(f"a prompt set named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_prompt_sets() -> list[str]:
    """Names accepted by :func:`load_prompts`, sorted."""
    _import_builtin_sets()
    return sorted(_REGISTRY)


def load_prompts(spec: str | os.PathLike[str] | Sequence[str] | PromptSet) -> PromptSet:
    """Resolve what the user passed into a :class:`PromptSet`.

    Args:
        spec: A registered name (see :func:`available_prompt_sets`), a path to a text file with one prompt
            per line (blank lines and lines starting with ``#`` are skipped), a list of prompts, or a
            ``PromptSet``.

    Raises:
        ValueError: For an unknown name (the message lists the available ones) or an empty set.

    >>> load_prompts(["a cat", "a dog"]).metadata  # a plain list: no metadata for the reward
    [{}, {}]
    >>> load_prompts("no_such_set")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown prompt set 'no_such_set'; available prompt sets: ...
    """
    if isinstance(spec, PromptSet):
        return spec
    if isinstance(spec, str | os.PathLike):
        text = os.fspath(spec)
        _import_builtin_sets()
        if text in _REGISTRY:
            return _REGISTRY[text]()
        path = Path(text)
        if path.suffix == ".txt" or path.exists():
            if not path.is_file():
                raise FileNotFoundError(f"prompt file {path} does not exist")
            try:
                lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"prompt file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8 "
                    "with one printable-ASCII prompt per line"
                ) from None
            kept = [ln for ln in lines if ln and not ln.startswith("#")]
            if not kept:
                raise ValueError(f"prompt file {path} has no prompts (only blank or '#' lines): add one per line")
            try:
                return PromptSet(kept, name=path.stem)
            except ValueError as exc:
                raise ValueError(f"prompt file {path}: {exc}") from None
        raise ValueError(
            f"unknown prompt set {text!r}; available prompt sets: {', '.join(available_prompt_sets())}. "
            "Pass one of these names, a list of prompts, or the path of a .txt file with one prompt per line."
        )
    if isinstance(spec, Sequence):
        return PromptSet(list(spec))
    raise TypeError(f"prompts must be a name, a path, a list of strings or a PromptSet, got {type(spec).__name__}")


def _read_data_lines(filename: str) -> list[str]:
    text = resources.files("diffusion_mdp").joinpath("data", "prompts", filename).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


# Data files from the authors' implementation (kvablack/ddpo-pytorch, MIT licence): data/prompts/README.md.
@register_prompt_set("imagenet_animals")
def imagenet_animals() -> PromptSet:
    """The 398 animal classes of ImageNet (the first 398 classes): the paper's prompt set for
    compressibility and aesthetics. Each prompt is the whole class line with its synonyms
    ("tench, Tinca tinca"), exactly as the authors' code feeds it to the model."""
    return PromptSet(_read_data_lines("imagenet_classes.txt")[:398], name="imagenet_animals")


@register_prompt_set("simple_animals")
def simple_animals() -> PromptSet:
    """The 45 common animals of the paper's prompt-alignment experiment."""
    return PromptSet(_read_data_lines("simple_animals.txt"), name="simple_animals")


@register_prompt_set("animals_activities")
def animals_activities() -> PromptSet:
    """Simple animals × 3 activities ("a cat riding a bike"): the prompt-alignment prompts."""
    prompts, metadata = [], []
    for animal in _read_data_lines("simple_animals.txt"):
        for activity in _read_data_lines("activities.txt"):
            prompts.append(f"{_with_article(animal)} {activity}")
            metadata.append({"animal": animal, "activity": activity})
    return PromptSet(prompts, metadata, name="animals_activities")


def _import_builtin_sets() -> None:
    """Import modules that register more sets (tiny-shapes registers shapes_* sets)."""
    if importlib.util.find_spec("diffusion_mdp.shapes.prompts") is not None:
        importlib.import_module("diffusion_mdp.shapes.prompts")
