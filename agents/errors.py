"""The agents' error for a setting that cannot work (imported by the config and by its file loading)."""


class ConfigError(ValueError):
    """A config value that cannot work; the message says which field and how to fix it."""
