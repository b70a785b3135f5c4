"""The typed config schema: the single source of every default, and the defaults are the paper's (docs/algorithm.md §7).

YAML files under `configs/` only override these values, and restate none (tests/test_config.py checks every leaf):
the default run is the CPU-scale preset `configs/experiment/cpu.yaml`, the paper presets in `configs/experiment/`
are a few overrides each. A named choice (teacher kind, distillation mode, rollout engine, ...) is checked against the
registry that implements it, so there is no second list of names here. Hydra validates every override against these dataclasses (a misspelled key fails at start), and
`__post_init__` checks values and cross-field rules with messages that name the key and the allowed values.

Environments bring their own schema (a subclass of `EnvConfig`, registered by the environment module), so that
`env=<name>` swaps both the environment and its fields.

The schema is split by config group: `checks` (ConfigError and the validation helpers), `model`, `env`, `rollout`,
`algorithm`, `training` (trainer, eval, test_time, logging); this module holds the root `SDPOConfig` and re-exports
every public name, so `from sdpo.config import X` works for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from sdpo.config.algorithm import (
    AlgorithmConfig,
    DistillConfig,
    PolicyLossConfig,
    RepromptConfig,
    TeacherConfig,
)
from sdpo.config.checks import ConfigError, check_choice, check_range
from sdpo.config.env import EnvConfig
from sdpo.config.model import LoRAConfig, ModelConfig
from sdpo.config.rollout import RolloutConfig, ServerConfig, VLLMConfig
from sdpo.config.training import (
    EvalConfig,
    KeepBestConfig,
    LoggingConfig,
    OptimConfig,
    OtherEnv,
    TestTimeConfig,
    TrainerConfig,
)


@dataclass
class SDPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    env: Any = MISSING  # an EnvConfig subclass, chosen by env=<name>
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    test_time: TestTimeConfig = field(default_factory=TestTimeConfig)

    def __post_init__(self) -> None:
        if self.trainer.mini_batch_questions > self.trainer.questions_per_step:
            raise ConfigError("trainer.mini_batch_questions cannot exceed trainer.questions_per_step")
        best = self.trainer.keep_best.metric
        if best is not None:
            if not self.eval.every:
                raise ConfigError(f"trainer.keep_best.metric={best!r} needs held-out evaluations: set eval.every "
                                  "(e.g. eval.every=2), or trainer.keep_best.metric=null")
            check_choice("trainer.keep_best.metric", best, self.eval.metric_names)
        algo = self.algorithm
        from sdpo.losses.distill import DISTILL_MODES
        from sdpo.rollout import ENGINES
        from sdpo.teacher.choices import TEACHER_KINDS, TEACHER_SCORERS

        scorer = TEACHER_SCORERS.get(algo.teacher.scorer)
        if algo.uses_teacher and not scorer.forward_in_update:
            needs = {
                "algorithm.distill.mode=sampled_token (the engine gives the sampled token's log-prob only)":
                    DISTILL_MODES.get(algo.distill.mode).token_advantage,
                "rollout.temperature=1.0 (the engine's prompt log-probs are not temperature-scaled)": self.rollout.temperature == 1.0,
            }
            if scorer.reads_rollout_engine:
                scoring = [name for name in ENGINES.in_order() if ENGINES.get(name).scores_teacher]
                needs = {
                    " or ".join(f"rollout={name}" for name in scoring): self.rollout.engine in scoring,
                    "algorithm.teacher.kind=live (the engine holds the current policy)":
                        TEACHER_KINDS.get(algo.teacher.kind)(algo.teacher) == [("live", 1.0)],
                } | needs
            missing = [what for what, ok in needs.items() if not ok]
            if missing:
                raise ConfigError(f"algorithm.teacher.scorer={algo.teacher.scorer} needs " + "; ".join(missing))


__all__ = [
    "AlgorithmConfig",
    "ConfigError",
    "DistillConfig",
    "EnvConfig",
    "EvalConfig",
    "KeepBestConfig",
    "LoRAConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "OtherEnv",
    "PolicyLossConfig",
    "RepromptConfig",
    "RolloutConfig",
    "SDPOConfig",
    "ServerConfig",
    "TeacherConfig",
    "TestTimeConfig",
    "TrainerConfig",
    "VLLMConfig",
    "check_choice",
    "check_range",
]
