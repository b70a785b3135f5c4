"""What `SDPOTrainer`'s keyword arguments become: a config, an environment, a tokenizer and the policy's source.

    SDPOTrainer(config=None, *, model=None, tokenizer=None, train_dataset=None, eval_dataset=None,
                reward_funcs=None, overrides=None)

- `overrides`: the command line's `key=value` strings, on top of `config` (or of the defaults, where group choices
  such as `algorithm=grpo` work too).
- `model`: a local path (or "tiny" / "smollm2-135m-instruct"), a `PreTrainedModel` or a PEFT model. An object goes
  through the same placement as a loaded model (dtype, LoRA, Accelerate, teacher copies).
- `train_dataset` / `eval_dataset` / `reward_funcs`: the `env=dataset` environment (sdpo/envs/dataset.py) with
  these objects in place of `env.path` / `env.eval_path` / `env.rewards`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sdpo.config import ConfigError, SDPOConfig
from sdpo.envs import Environment, build_environment
from sdpo.envs.dataset import DatasetEnv, DatasetEnvConfig
from sdpo.envs.rewards import qualified_name, resolve_reward


@dataclass
class TrainerInputs:
    config: SDPOConfig
    env: Environment
    tokenizer: Any
    # The checkpoint directory: the trainer loads it (unless `model` is given), vLLM serves it and ZeRO-3 reloads
    # it for the teacher. None only for a model object that was never saved.
    model_path: Path | None
    model: Any = None  # a model object handed in

    def load_policy(self) -> Any:
        """The policy before Accelerate's `prepare`: the handed-in object or the checkpoint, made ready alike."""
        from sdpo.models import load_model, prepare_policy

        if self.model is not None:
            return prepare_policy(self.model, self.config.model)
        return load_model(self.config.model, self.model_path)


def resolve_inputs(
    config: SDPOConfig | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    reward_funcs: Callable | str | Sequence[Callable | str] | None = None,
    overrides: Sequence[str] | None = None,
    env: Environment | None = None,
) -> TrainerInputs:
    own_data = train_dataset is not None or eval_dataset is not None or reward_funcs is not None
    if own_data and env is not None:
        raise ValueError("pass either env= or train_dataset= / eval_dataset= / reward_funcs=, not both")
    config = _compose(config, list(overrides or []), own_data)
    model_path, model = _model_source(config, model)
    tokenizer = _tokenizer(tokenizer, model_path)
    if own_data:
        env = _dataset_env(config, train_dataset, eval_dataset, reward_funcs)
    return TrainerInputs(config, env or build_environment(config.env), tokenizer, model_path, model)


def _compose(config: SDPOConfig | None, overrides: list[str], own_data: bool) -> SDPOConfig:
    from sdpo.hydra_config import check_overrides, load_config

    if config is None:
        picks_env = any(o.startswith("env=") for o in overrides)
        return load_config((["env=dataset"] if own_data and not picks_env else []) + overrides)
    if own_data and not isinstance(config.env, DatasetEnvConfig):
        raise ConfigError(f"train_dataset / eval_dataset / reward_funcs need the dataset environment, but the config's "
                          f"env is {config.env.name!r}: build it with load_config(['env=dataset', ...]) or pass "
                          "config=None")
    if not overrides:
        return config
    groups = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0]]
    if groups:
        raise ConfigError(f"overrides {groups} choose config groups, which need composing from the defaults: pass "
                          "them to load_config (or pass config=None and put everything in overrides)")
    check_overrides([f"env={config.env.name}", *overrides])
    merged = OmegaConf.merge(OmegaConf.structured(config), OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _model_source(config: SDPOConfig, model: Any) -> tuple[Path | None, Any]:
    """(checkpoint directory or None, model object or None); config.model records where the policy came from."""
    from sdpo.models import is_peft_model, resolve_checkpoint

    if model is None or isinstance(model, str | Path):
        if model is not None:
            config.model = dataclasses.replace(config.model, name_or_path=str(model))
        return resolve_checkpoint(config.model), None
    if not hasattr(model, "config") or not hasattr(model, "generate"):
        raise TypeError(f"model= takes a path, a transformers PreTrainedModel or a PEFT model, not "
                        f"{type(model).__name__}")
    if is_peft_model(model):
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the PEFT model has no trainable parameters: load its adapter with "
                             "PeftModel.from_pretrained(..., is_trainable=True)")
        # The teacher and the reference then use the adapter (disabled or EMA) instead of weight copies.
        config.model.lora = dataclasses.replace(config.model.lora, enabled=True)
        base = model.get_base_model()
    else:
        base = model
    name = str(getattr(base.config, "name_or_path", "") or "")
    path = Path(name).expanduser() if name and (Path(name).expanduser() / "config.json").exists() else None
    config.model = dataclasses.replace(config.model, name_or_path=str(path) if path else type(base).__name__)
    rollout = config.rollout
    from sdpo.rollout import ENGINES

    if path is None and ENGINES.get(rollout.engine).loads_checkpoint(rollout):
        raise ConfigError(f"rollout={rollout.engine} loads the policy from a checkpoint directory, and this model "
                          "object has none: save it (model.save_pretrained(dir); tokenizer.save_pretrained(dir)) and "
                          "pass model=dir, or use rollout=hf")
    return path, model


def _tokenizer(tokenizer: Any, model_path: Path | None) -> Any:
    from sdpo.models import load_tokenizer

    if tokenizer is None:
        if model_path is None:
            raise ValueError("pass tokenizer= with a model object that was never saved to a directory")
        return load_tokenizer(model_path)
    if tokenizer.pad_token_id is None:  # as load_tokenizer does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dataset_env(config: SDPOConfig, train_dataset: Any, eval_dataset: Any, reward_funcs: Any) -> DatasetEnv:
    """The dataset environment over the handed-in objects; paths go into the config (and are read from there)."""
    env_cfg: DatasetEnvConfig = config.env
    if isinstance(train_dataset, str | Path):
        env_cfg.path, train_dataset = str(train_dataset), None
    if isinstance(eval_dataset, str | Path):
        env_cfg.eval_path, eval_dataset = str(eval_dataset), None
    funcs = None
    if reward_funcs is not None:
        given = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else list(reward_funcs)
        funcs = [resolve_reward(f, env_cfg.answer_column) if isinstance(f, str) else f for f in given]
        env_cfg.rewards = [f if isinstance(f, str) else qualified_name(f) for f in given]  # a record, for config.yaml
    return DatasetEnv(env_cfg, train_dataset=train_dataset, eval_dataset=eval_dataset, reward_funcs=funcs)

