"""Environments: the registry, the interface and `build_environment`.

`env=<name>` in Hydra picks a registered environment together with its config schema. A researcher's own
environment needs no edit here: point `env._target_` at a subclass of `Environment` (its `config_class` validates
the remaining fields).
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any

from hydra.utils import get_class

from sdpo.envs.base import ENVIRONMENTS, DataError, Environment, Problem, Score


def _register_builtin() -> None:
    # Imported for their @ENVIRONMENTS.register side effect.
    from sdpo.envs import arithmetic, convention, dataset  # noqa: F401

    for optional in ("code", "science", "tooluse", "math", "bfcl"):
        try:
            __import__(f"sdpo.envs.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"sdpo.envs.{optional}":
                raise


def build_environment(config: Any) -> Environment:
    """An environment from its config: a registered schema instance, or a mapping with `_target_`."""
    fields = asdict(config) if is_dataclass(config) else dict(config)
    target = fields.get("_target_")
    if not target:
        raise ValueError("env config needs _target_ (the Environment class), e.g. env=arithmetic")
    cls = get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise TypeError(f"env._target_={target!r} is not a subclass of sdpo.envs.Environment")
    if not isinstance(config, cls.config_class):
        try:
            config = cls.config_class(**fields)
        except TypeError as exc:
            raise ValueError(f"env fields do not match {cls.config_class.__name__}: {exc}") from None
    return cls(config)


_register_builtin()

__all__ = ["ENVIRONMENTS", "DataError", "Environment", "Problem", "Score", "build_environment"]
