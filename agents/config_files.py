"""Config files: a run's settings as TOML, JSON or YAML (as the extension says), flat or in one ``[train]`` table.

:func:`load_config_file` returns the file's ``key = value`` pairs; :func:`~diffusion_mdp.agents.config.build_config`
layers them between a preset and the flags, and :class:`~diffusion_mdp.agents.config.TrainConfig` checks them.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG_FILE_FORMATS = {".toml": "TOML", ".json": "JSON", ".yaml": "YAML", ".yml": "YAML"}


def _json_object_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a key given twice is an error (JSON itself would keep the last one silently)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ConfigError(f"key {key!r} is given twice: keep one")
        result[key] = value
    return result


JSON_OBJECT_FIELDS = frozenset({"reward_kwargs"})
"""Config fields that hold an object (a JSON object on the command line, a table in a file)."""


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a flat config file, parsed as its extension says (``.toml``, ``.json``, ``.yaml``/``.yml``).

    The fields are either all at the top level or all in one ``train`` table; a file with both (or with
    other tables) is an error rather than a file whose other keys are silently ignored.

    Raises:
        ConfigError: Missing file, unknown extension, a syntax error (with the parser's position), keys given
            twice, keys outside the ``[train]`` table, or YAML without PyYAML installed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    kind = CONFIG_FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(
            f"config file {path}: unknown extension {path.suffix or '(none)'!r}; name it .toml, .json or .yaml "
            "so that it is parsed as what it is"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8"
        ) from None
    try:
        if kind == "JSON":
            data = json.loads(text, object_pairs_hook=_json_object_no_duplicates)
        elif kind == "TOML":
            data = tomllib.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    f"config file {path} is YAML but PyYAML is not installed: pip install pyyaml, or write the "
                    "same keys as TOML (run.toml)"
                ) from None
            data = yaml.safe_load(text)  # safe_load: plain data only, no Python objects
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except Exception as exc:  # each parser has its own error type; all of them mean a syntax error
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold key = value pairs (a table), got a {type(data).__name__}")
    if isinstance(data.get("train"), dict):
        others = sorted(k for k in data if k != "train")
        if others:
            raise ConfigError(
                f"config file {path} has keys outside its [train] table: {', '.join(others)}. They would be "
                "ignored: move them into [train], or drop the [train] header and keep every key at the top level"
            )
        data = data["train"]
    tables = sorted(k for k, v in data.items() if isinstance(v, dict) and k not in JSON_OBJECT_FIELDS)
    if tables:
        raise ConfigError(
            f"config file {path}: {', '.join(tables)} is a table; config files are flat (key = value), with at most "
            f"one [train] table (and tables only for {', '.join(sorted(JSON_OBJECT_FIELDS))})"
        )
    return dict(data)
