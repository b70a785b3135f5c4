"""Validation helpers of the config schema: every check names the key, and the allowed values or range."""

from __future__ import annotations

from collections.abc import Iterable
import difflib
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key and what to set instead."""


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    """`allowed`: a list of values, or a registry (`sdpo.registry.Registry`: its names in registration order)."""
    allowed = allowed.in_order() if hasattr(allowed, "in_order") else list(allowed)
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}={value!r} is not valid; allowed values: {', '.join(map(repr, allowed))}{hint}")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{key}={value!r} is out of range; it must lie in {bounds}")
