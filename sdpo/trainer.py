"""`SDPOTrainer`: one training step of Self-Distillation Policy Optimization, readable from top to bottom.

    questions -> rollouts, rewards and feedback (collector) -> teacher context (reprompts) -> advantages
              -> optimizer steps over mini-batches of whole groups (learner) -> engine weight sync

SDPO, GRPO and their hybrids are one step and one objective (`sdpo.losses.objective`): `algorithm.grpo_weight`
(lambda) is 0 for pure SDPO, 1 for GRPO (no teacher: `sdpo.teacher.NoTeacher`), in between for the hybrid, mixed at
the advantage level (paper Eq. 3) or the loss level. The boxes live in modules of their own: rollouts and scoring
in `sdpo.rollout.collector`, the reprompts in `sdpo.teacher`, the update in `sdpo.learner`, where the processes are
in `sdpo.distributed`, and the run around the step (evaluation schedule, keep-best, checkpoints, resume) in
`sdpo.run`. docs/architecture.md follows one step through them.

Where this departs from the paper's public code (a verl fork), and why:
- Reprompts that are too long lose demonstration and feedback tokens, never the question, instruction or chat
  header (the public code truncates from the right and can cut the instruction).
- Losses are normalised by the global loss-token count of the optimizer step (all micro-batches and processes), so
  results do not depend on micro-batch size.
- Top-k distillation takes the top-k of the *current* student at each step (the public code does the same), and the
  teacher forward runs inside the update, chunked over the sequence together with the student's vocabulary
  projection, so neither model's full [B, R, V] logits are held (`sdpo.models.ResponseFeatures`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from accelerate.utils import set_seed

from sdpo.batch import RolloutBatch
from sdpo.config import SDPOConfig
from sdpo.diagnostics import FailureModes, context_metrics
from sdpo.distributed import Distributed
from sdpo.envs import Environment, Problem
from sdpo.envs.sampler import QuestionSampler
from sdpo.inputs import resolve_inputs
from sdpo.learner import Learner
from sdpo.losses import MIXES
from sdpo.models import load_model
from sdpo.precision import keep_freed_memory, resolve_precision, use_all_cores
from sdpo.rollout import RolloutEngine
from sdpo.rollout.ahead import RolloutsAhead
from sdpo.rollout.collector import Collector
from sdpo.rollout.episodes import episode_advantages
from sdpo.run import RunLoop, run_directory
from sdpo.teacher import group_reprompts, reprompt_stats
from sdpo.tracking import StageTimer


@dataclass
class StepResult:
    metrics: dict[str, float]
    batch: RolloutBatch  # the step's rollouts with their rewards and feedback (sample tables, test-time discovery)


class SDPOTrainer:
    """`config` (or the defaults) with `overrides`; a model, datasets and reward functions of one's own
    (sdpo/inputs.py, docs/own_data.md). `env` and `engine` replace the ones the config would build (a researcher's
    own objects, scripted tests)."""

    def __init__(self, config: SDPOConfig | None = None, *, model: Any = None, tokenizer: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, reward_funcs: Any = None,
                 overrides: list[str] | None = None, env: Environment | None = None,
                 engine: RolloutEngine | None = None) -> None:
        inputs = resolve_inputs(config, model=model, tokenizer=tokenizer, train_dataset=train_dataset,
                                eval_dataset=eval_dataset, reward_funcs=reward_funcs, overrides=overrides, env=env)
        self.config = config = inputs.config
        resolve_precision(config)  # `auto` dtypes -> what this machine runs natively (saved in config.yaml)
        self.dist = Distributed(config.trainer)  # the launch: processes and how the policy is spread over them
        set_seed(config.trainer.seed)
        self.run_dir = run_directory(config, self.dist)
        self.env, self.tokenizer, self.model_path = inputs.env, inputs.tokenizer, inputs.model_path
        self.timer = StageTimer()
        self.collector = Collector(config, self.env, self.tokenizer, self.dist, self.timer)  # renders the questions
        self.train_problems = self.collector.renderable(self.env.load(config.env.train_split))
        held_out = self.collector.renderable(self.env.load(config.env.eval_split))
        self.eval_problems = held_out[: config.eval.num_questions]
        self.sampler = QuestionSampler(len(self.train_problems), config.trainer.seed)
        # The policy, its optimizer, the teacher's weights and the KL reference (copies taken from a fresh load
        # where the launch splits weights while loading).
        reload = lambda: load_model(replace(config.model, gradient_checkpointing=False), self.model_path)  # noqa: E731
        self.learner = Learner(config, self.dist, inputs.load_policy(), reload, self.tokenizer, self.timer)
        self.engine = engine or self.collector.build_engine(self.learner, self.model_path)
        self.collector.engine = self.engine
        self.learner.teacher.check_engine(self.engine)
        # Every allowed core for the forward/backward, also after an in-process vLLM engine disabled set_num_threads;
        # freed memory kept for the next step's tensors rather than faulted in again.
        self.threads = use_all_cores()
        keep_freed_memory()
        self.failure_modes = FailureModes()  # sdpo/diagnostics.py: echo, copying, drift, vanishing updates
        self.rollouts = RolloutsAhead(self.collector, self.sampler, self.next_questions, config.rollout.async_steps,
                                      config.trainer.total_steps, self.timer)  # now, or rollout.async_steps ahead
        self.run = RunLoop(self)  # resumes from a checkpoint (trainer.resume), opens the metrics log
        if self.step > 0 or getattr(self.engine, "out_of_process", False):  # resumed weights; a server: any weights
            self.sync_engine()
            self.timer.pop()  # not part of the first step's time

    @property
    def step(self) -> int:
        """Steps taken so far (the run's counter: `sdpo.run.RunLoop`)."""
        return self.run.step

    def train(self) -> dict[str, float]:
        """Steps until trainer.total_steps, with evaluation, keep-best, checkpoints and logging (`sdpo.run`)."""
        return self.run.train()

    # ------------------------------------------------------------------------------------------------------------
    # one step

    def training_step(self) -> StepResult:
        """One generation batch: rollouts, rewards, teacher context, advantages, then the optimizer steps over it."""
        acfg = self.config.algorithm
        batch, problems_B, metrics = self.rollouts.take(self.step)  # with async_steps, sampled by older weights
        with self.timer("teacher_context"):  # reprompts and their token ids (and engine-side teacher scoring)
            batch, context_metrics = self.teacher_context(batch, problems_B)
        metrics |= context_metrics
        batch = batch.with_advantages(episode_advantages(batch, acfg.norm_adv_by_std, acfg.advantage_estimator))
        with self.timer("update"):
            metrics |= self.learner.update(batch, self.step)
        self.run.advance()
        metrics |= self.sync_engine()
        metrics |= self.failure_modes.drift(metrics)
        return StepResult(metrics | self.timer.pop(), batch)

    def sync_engine(self) -> dict[str, float]:
        """The engine serves the policy's weights from now on, as version `self.step` (after the rollouts sampled by
        the previous weights, with async_steps, are in)."""
        self.rollouts.drain()
        with self.timer("sync"):
            sync = self.engine.sync_weights(self.learner.unwrapped, version=self.step)
        return {"sync/seconds": sync.seconds, "sync/mib": sync.bytes / 2**20, **sync.extra}

    def next_questions(self) -> list[Problem]:
        """This process's share of the step's questions (every process draws the same global list)."""
        indices = self.sampler.take(self.config.trainer.questions_per_step)
        return [self.train_problems[i] for i in self.dist.share(indices)]

    def teacher_context(self, batch: RolloutBatch, problems_B: list[Problem]) -> tuple[RolloutBatch, dict[str, float]]:
        """Reprompts (docs/algorithm.md §2): a sibling's solution and/or the env's feedback; a mask where there is neither.
        The teacher renders them (and an engine-side teacher scores them now): the batch with its teacher context,
        and the context's metrics."""
        rcfg = self.config.algorithm.reprompt
        rewards, groups = batch.rewards_B.tolist(), batch.group_ids_B.tolist()
        episodes = batch.episode_ids_B.tolist() if batch.episode_ids_B is not None else None
        reprompts = group_reprompts(f"{self.config.trainer.seed}:{self.step}", rcfg, problems_B, batch.response_text,
                                    rewards, batch.feedback, groups, episodes, batch.data_context or None)
        stats = reprompt_stats(reprompts, rewards, groups, rcfg.success_reward_threshold)
        failure_modes = context_metrics(rcfg, [p.question for p in problems_B], batch.response_text,
                                        [r.solution for r in reprompts], [r.feedback for r in reprompts], rewards,
                                        groups)
        context = self.learner.teacher.context(batch, reprompts, self.tokenizer, rcfg,
                                               self.config.model.chat_template_kwargs, self.engine)
        metrics = self.dist.reduce_mean({f"teacher/{k}": v for k, v in vars(stats).items()} | failure_modes)
        batch = batch.with_teacher(context)
        if batch.distill_mask_B is not None:
            # A routing mix (SRPO, docs/algorithm.md §12) distils only the failed rows; the others take the policy loss.
            success_B = batch.rewards_B >= rcfg.success_reward_threshold
            mix = MIXES.get(self.config.algorithm.mix)
            batch = replace(batch, distill_mask_B=mix.distilled_rows(batch.distill_mask_B, success_B))
        return batch, metrics

    def sampling_step(self) -> StepResult:
        """A step that samples and scores without learning (the best-of-k baseline of test-time runs)."""
        batch, _, metrics = self.collector.collect(self.next_questions(), self.step)
        self.run.advance()
        return StepResult(metrics | self.timer.pop(), batch)

    def evaluate(self) -> dict[str, float]:
        """The held-out questions' avg@k / pass@k (or episode success), averaged over processes."""
        return self.collector.evaluate(self.eval_problems)

    def stateful_parts(self) -> dict[str, Any]:
        """The parts whose state a checkpoint keeps (each through its own `state_dict` / `load_state_dict`), by
        name: the learner's schedule and teacher, the question sampler (with the rollouts taken ahead) and the
        failure-mode detectors' history."""
        return {"learner": self.learner, "sampler": self.rollouts, "failure_modes": self.failure_modes}

    def save(self, name: str | None = None) -> Any:
        """A checkpoint now (every process takes part; `sdpo.run.RunLoop.save`)."""
        return self.run.save(name)
