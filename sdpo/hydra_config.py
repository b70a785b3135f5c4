"""Hydra wiring: the schema goes into the ConfigStore, `configs/` YAML files override it.

Each YAML option of a group starts from its schema (`defaults: [<name>_schema, _self_]` for environments; the
top-level `config.yaml` starts from `sdpo_schema`), so a misspelled key or a wrongly typed value fails when Hydra
composes the config, and `__post_init__` then checks values and cross-field rules. `check_overrides` runs before
Hydra does, so that a wrong group option or key gets a message naming the valid ones and the closest match.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import difflib
from pathlib import Path
import typing

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from sdpo.config import ConfigError, SDPOConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def register_configs() -> None:
    from sdpo.envs import ENVIRONMENTS

    store = ConfigStore.instance()
    store.store(name="sdpo_schema", node=SDPOConfig)
    for name in ENVIRONMENTS.names():
        store.store(group="env", name=f"{name}_schema", node=ENVIRONMENTS.get(name).config_class)


def to_config(cfg: DictConfig) -> SDPOConfig:
    """The composed DictConfig as typed dataclasses (runs every __post_init__ check)."""
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, SDPOConfig)
    return config


def _schema_fields(schema: type) -> dict[str, object]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(schema)}


def _is_key_override(override: str) -> bool:
    """`a.b=value` on a schema key (what `_check_key` checks); group choices, `+`/`~` and `hydra.*` are Hydra's."""
    key = override.split("=", 1)[0]
    return "=" in override and "." in key and key[0] not in "+~" and not key.startswith("hydra.")


def _compose(overrides: Sequence[str], config_name: str = "config") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def _unknown_option(group: str, option: str, options: Sequence[str]) -> ConfigError:
    """`algorithm=sdpoo`: name the group's options and the closest match (Hydra lists the options only)."""
    options = [o for o in options if not o.endswith("_schema")]  # schema nodes in the ConfigStore are not choices
    close = difflib.get_close_matches(option, options, n=1)
    hint = f"; did you mean {group}={close[0]}?" if close else ""
    return ConfigError(f"unknown {group} option {option!r}: available {group} options: {', '.join(options)}{hint}")


def _check_choices(choices: Sequence[str]) -> None:
    """Every `group=option` names an existing option. Hydra skips a missing option of an optional group silently
    (`experiment=typo` would run the default config), hence this check ahead of it."""
    if any(c.startswith(("hydra.searchpath=", "+hydra.searchpath=")) for c in choices):
        return  # options from another search path: Hydra's own check, when it composes
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for choice in choices:
            group, _, option = choice.removeprefix("+").partition("=")
            if group == "sweep":  # configs/sweep/ is read by scripts/sweep.py, not composed into a run's config
                raise ConfigError(f"{choice} names a sweep: run it with `python scripts/sweep.py {choice}`")
            if group.startswith(("~", "hydra")) or "." in group or option in ("", "null"):
                continue
            options = loader.get_group_options(group)
            if "(" in option:  # a sweep function (glob(...), choice(...)): Hydra expands it
                continue
            for one in option.split(","):  # a multirun sweep, algorithm=sdpo,grpo
                if options and one not in options:
                    raise _unknown_option(group, one, options)


def check_overrides(overrides: Sequence[str], config_name: str = "config") -> None:
    """Reject unknown group options (`env=nope`) and unknown keys (`a.b.c=value`), naming the valid ones and the
    closest matches; Hydra would reject both, without saying what would have been right.

    `env.*` keys are checked against the schema of the environment the command line selects, with `env=` or
    through a preset (`experiment=livecodebench env.path=...`): the group choices are composed first to find it.
    """
    register_configs()
    choices = [o for o in overrides if not _is_key_override(o)]
    _check_choices(choices)
    try:
        composed = _compose(choices, config_name)
        env_schema = OmegaConf.get_type(composed.env) if "env" in composed else None
    except MissingConfigException as exc:  # a missing option of a group under another search path
        group, _, option = (exc.missing_cfg_file or "").rpartition("/")
        raise _unknown_option(group, option, exc.options or []) from None
    except HydraException:
        env_schema = None  # Hydra reports what is wrong when it composes the whole command line
    for override in filter(_is_key_override, overrides):
        _check_key(override.split("=", 1)[0], env_schema)


def _check_key(key: str, env_schema: type | None) -> None:
    schema: object = SDPOConfig
    path: list[str] = []
    for part in key.split("."):
        if path == ["env"] and schema is typing.Any:
            schema = env_schema
        if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
            return  # a dict, list or custom environment: nothing to check against
        fields = _schema_fields(schema)
        if part not in fields:
            where = ".".join(path) or "the top level"
            close = difflib.get_close_matches(part, list(fields), n=3)
            hint = f"; did you mean {', '.join('.'.join([*path, c]) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}: valid keys under {where}: {', '.join(fields)}{hint}")
        path.append(part)
        schema = fields[part]
        if typing.get_origin(schema) is typing.Union:  # X | None
            schema = next((a for a in typing.get_args(schema) if a is not type(None)), schema)


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> SDPOConfig:
    """Compose a config as `scripts/train.py` would, for notebooks and tests: `load_config(["env=arithmetic"])`."""
    register_configs()
    _check_choices([o for o in overrides if not _is_key_override(o)])
    try:
        cfg = _compose(overrides, config_name)
    except HydraException:
        check_overrides(overrides, config_name)  # the clearer message, where it has one
        raise
    return to_config(cfg)
