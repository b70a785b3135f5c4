"""The rollout side of a training step: questions -> episodes (one turn or many) -> a scored `RolloutBatch`.

A single-turn run is a one-turn episode: one code path generates, scores (the environment's pooled, sandboxed
`score_batch`) and assembles the batch; `rollout.max_turns` > 1 only lets episodes go on (sdpo/rollout/episodes.py,
docs/multi_turn.md). The collector also renders each question's prompt once and picks the rollout engine.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from sdpo.batch import RolloutBatch
from sdpo.config import ConfigError, OtherEnv, SDPOConfig
from sdpo.distributed import Distributed
from sdpo.envs import ENVIRONMENTS, Environment, Problem, build_environment
from sdpo.evaluation import evaluate_policy
from sdpo.rollout import ENGINES, EngineSource, RolloutEngine, SamplingSettings, build_engine
from sdpo.rollout.episodes import EpisodeLimits, episode_metrics, rendered_prompts, run_episodes
from sdpo.tracking import StageTimer

if TYPE_CHECKING:
    from sdpo.learner import Learner


def other_env_config(other: OtherEnv) -> Any:
    """The environment config of one of eval.other_envs: its registered class with the entry's settings."""
    config_class = ENVIRONMENTS.get(other.name).config_class
    valid = {f.name for f in fields(config_class)}
    if unknown := sorted(set(other.settings) - valid):
        raise ConfigError(f"eval.other_envs[{other.label}]: environment {other.name!r} has no setting {unknown}; "
                          f"its settings: {sorted(valid - {'_target_'})}")
    return config_class(**other.settings)


class Collector:
    """`engine` is set once the policy it samples from exists (`build_engine`), or given (a researcher's own)."""

    def __init__(self, config: SDPOConfig, env: Environment, tokenizer: PreTrainedTokenizerBase, dist: Distributed,
                 timer: StageTimer) -> None:
        self.config, self.env, self.tokenizer, self.dist, self.timer = config, env, tokenizer, dist, timer
        self.engine: RolloutEngine | None = None
        self.limits = EpisodeLimits.from_config(config)
        self._prompt_ids: dict[int, list[int]] = {}  # keyed by id(problem): ids need not be unique across splits
        self._others: list[tuple[str, Environment, list[Problem], SDPOConfig]] | None = None  # eval.other_envs
        for other in config.eval.other_env_specs:  # a misspelled name or setting fails at start, saying what is valid
            other_env_config(other)

    def build_engine(self, learner: Learner, model_path: Any) -> RolloutEngine:
        """The configured engine over the learner's policy, with a context window for the rollouts and for what the
        teacher has it read (reprompt plus response when the engine scores the teacher)."""
        rollout = self.config.rollout
        if ENGINES.get(rollout.engine).out_of_process and self.dist.world > 1:
            raise ConfigError(f"rollout={rollout.engine} syncs one trainer process's weights to the server; this launch has "
                              f"{self.dist.world} processes: run it as one process (the server can still use "
                              "several GPUs: rollout.server.extra_args=[--tensor-parallel-size,N]) or use rollout=vllm")
        max_model_len = max(rollout.max_prompt_len + rollout.max_new_tokens, learner.teacher.engine_context_len)
        return build_engine(rollout, EngineSource(learner.unwrapped, self.tokenizer, model_path, max_model_len,
                                                  learner.autocast_dtype, sharded=self.dist.sharded))

    def renderable(self, problems: list[Problem], training_env: bool = True) -> list[Problem]:
        """Render every prompt once; drop (and report) those longer than rollout.max_prompt_len. With
        env.reference_as_teacher_context, each of the training environment's problems carries its reference for the
        teacher."""
        if training_env and self.config.env.reference_as_teacher_context:
            reference = getattr(self.env, "reference_response", None)
            if reference is None:
                raise ConfigError(f"env.reference_as_teacher_context=true: the {self.config.env.name} environment "
                                  "has no reference_response; give the data a privileged_context column instead")
            problems = [replace(p, teacher_context=reference(p)) for p in problems]
        kept = []
        for p, ids in rendered_prompts(self.tokenizer, problems, self.config.rollout.max_prompt_len,
                                       self.config.model.chat_template_kwargs):
            self._prompt_ids[id(p)] = ids
            kept.append(p)
        return kept

    def prompt_ids(self, problem: Problem) -> list[int]:
        return self._prompt_ids[id(problem)]

    def collect(self, problems: list[Problem], step: int, timer: StageTimer | None = None
                ) -> tuple[RolloutBatch, list[Problem], dict[str, float]]:
        """G episodes per question, generated and scored turn by turn: the batch (one row per model turn), each row's
        problem as the turn saw it, and the batch's reward and length metrics (means over processes), with the
        version of the weights that sampled it where the engine reports one (`rollout/weights_version`). `timer`:
        where the generate / score stages are timed (a background collection's own; default the step's)."""
        seed = self.dist.sampling_seed(self.config.trainer.seed, step)
        sampling = SamplingSettings.from_config(self.config.rollout, seed=seed)
        rollout = run_episodes(self.engine, self.env, self.tokenizer, problems, [self.prompt_ids(p) for p in problems],
                               sampling, self.limits, self.dist.any_rank, timer or self.timer)
        batch, problems_B = rollout.batch(self.config.algorithm.episode_return, self.config.algorithm.episode_discount)
        if self.limits.max_turns == 1:  # a one-turn episode is a single-turn row: no episode fields to carry
            batch = replace(batch, episode_ids_B=None, turn_B=None, returns_B=None)
        versions = [row.completion.weights_version for row in rollout.rows]
        reported = {"rollout/weights_version": float(min(versions))} if versions and None not in versions else {}
        return batch, problems_B, self.metrics(batch) | reported

    def metrics(self, batch: RolloutBatch) -> dict[str, float]:
        lengths = batch.response_lengths_B
        return self.dist.reduce_mean({
            "reward/mean": batch.rewards_B.mean(),
            "response/length_mean": lengths.mean(),
            "response/truncated_fraction": batch.truncated_B.float().mean(),
            **episode_metrics(batch, self.config.algorithm.reprompt.success_reward_threshold),
        }) | {"response/length_max": float(self.dist.reduce(lengths.max(), "max"))}

    def evaluate(self, problems: list[Problem]) -> dict[str, float]:
        """avg@k / pass@k (or episode success) on this process's share of `problems`, and on eval.other_envs'
        held-out questions (eval_<label>/...), averaged over processes."""
        metrics = {}
        for prefix, env, held_out, config in [("eval", self.env, problems, self.config), *self.other_held_out()]:
            mine = self.dist.share(held_out)
            metrics |= evaluate_policy(self.engine, env, self.tokenizer, mine, [self.prompt_ids(p) for p in mine],
                                       config, self.dist.any_rank, prefix)
        return self.dist.reduce_mean(metrics)

    def other_held_out(self) -> list[tuple[str, Environment, list[Problem], SDPOConfig]]:
        """(metric prefix, environment, held-out questions, the config its evaluation reads) of each of
        eval.other_envs, built on first use with the entry's settings."""
        if self._others is None:
            self._others = []
            for other in self.config.eval.other_env_specs:
                env = build_environment(other_env_config(other))
                held_out = self.renderable(env.load(env.config.eval_split), training_env=False)
                config = self.config
                if other.max_new_tokens is not None:
                    config = replace(config, eval=replace(config.eval, max_new_tokens=other.max_new_tokens))
                self._others.append((f"eval_{other.label}", env, held_out[: self.config.eval.num_questions], config))
        return self._others
