"""Hydra wiring: the schema goes into the ConfigStore, `configs/` YAML files override it.

Each YAML option of a group starts from its schema (`defaults: [<name>_schema, _self_]` for environments; the
top-level `config.yaml` starts from `sdpo_schema`), so a misspelled key or a wrongly typed value fails when Hydra
composes the config, and `__post_init__` then checks values and cross-field rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import difflib
from pathlib import Path
import sys
import typing

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sdpo.config import ConfigError, SDPOConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def register_configs() -> None:
    from sdpo.envs import ENVIRONMENTS

    # `${sdpo_default:${trainer.output_dir},runs/...}` in config.yaml: the run directory is trainer.output_dir when
    # set, else a timestamped one (oc.select would keep an explicit null).
    OmegaConf.register_new_resolver("sdpo_default", lambda value, default: default if value is None else value, replace=True)
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


def check_override_keys(overrides: Sequence[str]) -> None:
    """Reject `a.b.c=value` overrides whose key the schema lacks, naming the valid keys and the closest matches.

    Hydra would reject them too, but without saying what the valid keys are. Group choices (`env=code`),
    additions (`+key=`), deletions (`~key`) and `hydra.*` keys are left to Hydra.
    """
    from sdpo.envs import ENVIRONMENTS

    env_name = next((o.split("=", 1)[1] for o in overrides if o.startswith("env=")), "arithmetic")
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or "." not in key or key[0] in "+~" or key.startswith("hydra."):
            continue
        schema: object = SDPOConfig
        path: list[str] = []
        for part in key.split("."):
            if path == ["env"] and schema is typing.Any:
                schema = ENVIRONMENTS.get(env_name).config_class if env_name in ENVIRONMENTS else None
            if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
                break  # a dict, list or custom environment: nothing to check against
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


def run_checked(main: Callable[[], None]) -> None:
    """Run a `@hydra.main` entry point after rejecting unknown override keys, naming the valid ones."""
    try:
        check_override_keys(sys.argv[1:])
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    main()


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> SDPOConfig:
    """Compose a config as `scripts/train.py` would, for notebooks and tests: `load_config(["env=arithmetic"])`."""
    register_configs()
    check_override_keys(overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return to_config(cfg)
