"""Hydra wiring: the schema goes into the ConfigStore, `configs/` YAML files override it.

Each YAML option of a group starts from its schema (`defaults: [<name>_schema, _self_]` for environments; the
top-level `config.yaml` starts from `sdpo_schema`), so a misspelled key or a wrongly typed value fails when Hydra
composes the config, and `__post_init__` then checks values and cross-field rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sdpo.config import SDPOConfig

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


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> SDPOConfig:
    """Compose a config as `scripts/train.py` would, for notebooks and tests: `load_config(["env=arithmetic"])`."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return to_config(cfg)
