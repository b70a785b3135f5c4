"""Validation helpers of the config schema: every check names the key, and the allowed values or range."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key and what to set instead."""


def check_choice(key: str, value: Any, allowed: list[Any] | tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; allowed values: {', '.join(map(repr, allowed))}")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{key}={value!r} is out of range; it must lie in {bounds}")
