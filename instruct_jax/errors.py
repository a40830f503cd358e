"""The lowest floor: the error every layer raises for a bad setting, and the CLI's exit codes.

Everything may import this module; it imports nothing from the package.
"""

from __future__ import annotations

# Exit codes of `python -m instruct_jax` (docs/RELIABILITY.md).
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # a configuration or data error, named on one `error:` line
EXIT_DIVERGED = 3  # the numerical guard stopped the run (train/guards.py)


class ConfigError(ValueError):
    """A configuration problem. `field` is the dotted name of the offending setting."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"config field '{field_name}': {message}")
