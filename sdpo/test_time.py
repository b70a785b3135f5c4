"""Test-time self-distillation (the paper's runs on single hard questions; docs/algorithm.md §7, §8).

One question at a time, from the initial weights: sample `rollout.num_generations` attempts, score them, stop at
the first success; otherwise take a training step on the failed attempts (SDPO: the self-teacher sees the
environment's feedback, since there is no successful sibling to show) and sample again, until `test_time.budget`
attempts. The baselines draw the same number of attempts from the initial weights without any update: best-of-k
samples the question afresh each time; multi-turn (the paper's) keeps rollout.num_generations conversations going,
each failed attempt answered by the environment (`Environment.follow_up`: its feedback) and tried again in the
growing conversation, the earliest exchanges evicted first-in-first-out at rollout.max_prompt_len. Every sampled
turn counts as one attempt. discovery@k is the fraction of questions solved within k attempts.

Each (question, method) runs in a fresh `SDPOTrainer` over a one-question environment, so the weights, optimizer
and teacher start from the checkpoint every time, and the attempts of a step are counted in sampling order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
import logging
import tempfile
from typing import Any

from sdpo.config import SDPOConfig, check_choice
from sdpo.envs import Environment, Problem, build_environment
from sdpo.registry import Registry
from sdpo.rollout import ENGINES, RolloutEngine, SamplingSettings
from sdpo.rollout.episodes import EpisodeLimits, EpisodeRollout

log = logging.getLogger(__name__)


@dataclass
class Discovery:
    question_id: str
    method: str
    attempts: int  # attempts sampled (a multiple of rollout.num_generations, at most the budget rounded up)
    solved_at: int | None  # 1-based index of the first successful attempt; None: not solved within the budget


class OneQuestion:
    """An environment that serves one problem for every split and scores with the wrapped environment."""

    def __init__(self, env: Environment, problem: Problem) -> None:
        self.env, self.problem = env, problem

    def load(self, split: str) -> list[Problem]:
        return [self.problem]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


def solve(config: SDPOConfig, env: Environment, problem: Problem, method: str,
          engine: RolloutEngine | None = None) -> tuple[Discovery, RolloutEngine]:
    """Attempts on `problem` until one succeeds or the budget is spent; `method` is "sdpo", "best_of_k" or
    "multi_turn".

    Returns the discovery and the rollout engine, left open: a vLLM engine takes seconds and memory to start, so
    `run_test_time` passes it to the next question (it is first synced to that question's initial weights).
    """
    from sdpo.trainer import SDPOTrainer

    # Nothing of the per-question trainer is kept: its run directory is temporary and it logs nowhere.
    scratch = tempfile.TemporaryDirectory(prefix="sdpo-test-time-")
    config = replace(config, trainer=replace(config.trainer, output_dir=scratch.name, resume="none", save_every=0),
                     logging=replace(config.logging, wandb="disabled", tensorboard=False))
    trainer = SDPOTrainer(config, env=OneQuestion(env, problem), engine=engine)  # type: ignore[arg-type]
    if engine is not None:
        engine.sync_weights(trainer.learner.unwrapped)  # a reused engine still serves the previous question's weights
    try:
        return TEST_TIME_METHODS.get(method)(trainer, problem), trainer.engine
    finally:
        trainer.run.tracker.close()
        scratch.cleanup()


def attempts_until_solved(trainer: Any, problem: Problem, method: str, step: Callable[[], Any]) -> Discovery:
    """`step` (a training or a sampling step of `trainer`) until a rollout succeeds or the budget is spent. Either
    step advances the trainer's step, so the next batch samples with the next seed."""
    threshold = trainer.config.algorithm.reprompt.success_reward_threshold
    attempts = 0
    while attempts < trainer.config.test_time.budget:
        batch = step().batch
        solved = (batch.rewards_B >= threshold).nonzero().flatten()
        if len(solved):
            return Discovery(problem.id, method, attempts + len(batch), attempts + int(solved[0]) + 1)
        attempts += len(batch)
    return Discovery(problem.id, method, attempts, None)


def multi_turn(trainer: Any, problem: Problem) -> Discovery:
    """The multi-turn baseline on `trainer`'s initial weights: conversations that continue until one succeeds or the
    budget is spent (an episode its environment ends without success restarts from the question)."""
    config = trainer.config
    threshold, budget = config.algorithm.reprompt.success_reward_threshold, config.test_time.budget
    limits = EpisodeLimits.from_config(config, max_turns=budget)
    prompt_ids = trainer.collector.prompt_ids(trainer.train_problems[0])  # the one question, rendered once
    attempts, turn, rollout = 0, 0, None
    while attempts < budget:
        if rollout is None or not rollout.live:
            rollout = EpisodeRollout(trainer.engine, trainer.env, trainer.tokenizer, limits)
            rollout.begin([problem], [prompt_ids], config.rollout.num_generations)
        sampling = SamplingSettings.from_config(config.rollout, seed=trainer.dist.sampling_seed(config.trainer.seed, turn))
        rows = rollout.next_turn(sampling)
        turn += 1
        solved = [k for k, row in enumerate(rows) if row.result.reward >= threshold]
        if solved:
            return Discovery(problem.id, "multi_turn", attempts + len(rows), attempts + solved[0] + 1)
        attempts += len(rows)
    return Discovery(problem.id, "multi_turn", attempts, None)


# test_time.methods: (a fresh trainer on one question, the question) -> its discovery. "sdpo": generate, score,
# reprompt, update, sync; "best_of_k": generate and score from the initial weights; "multi_turn": conversations.
TEST_TIME_METHODS: Registry[Callable[[Any, Problem], Discovery]] = Registry("test-time method")
TEST_TIME_METHODS.register("sdpo")(lambda trainer, problem: attempts_until_solved(trainer, problem, "sdpo",
                                                                                  trainer.training_step))
TEST_TIME_METHODS.register("best_of_k")(lambda trainer, problem: attempts_until_solved(trainer, problem, "best_of_k",
                                                                                       trainer.sampling_step))
TEST_TIME_METHODS.register("multi_turn")(multi_turn)


def discovery_at(results: Sequence[Discovery], k: int) -> float:
    """The fraction of questions solved within k attempts."""
    return sum(r.solved_at is not None and r.solved_at <= k for r in results) / max(len(results), 1)


def run_test_time(config: SDPOConfig, env: Environment | None = None,
                  engine_factory: Callable[[], RolloutEngine] | None = None,
                  progress: Callable[[int, int, Discovery | None], None] | None = None) -> dict[str, Any]:
    """Every method on every question of `test_time.split`: the report scripts/test_time.py writes.

    `progress(done, total, found)`: called with (0, total, None) before the first question and after each (question,
    method) run with its discovery (scripts/test_time.py's progress bar); each result is then logged at DEBUG (the log
    file) rather than INFO (the terminal too)."""
    ttc = config.test_time
    for method in ttc.methods:
        check_choice("test_time.methods[]", method, TEST_TIME_METHODS)
    env = env or build_environment(config.env)
    problems = env.load(ttc.split)[: ttc.num_questions]
    if not problems:
        raise ValueError(f"test_time.split={ttc.split!r} of env {config.env.name!r} holds no problems")
    results: dict[str, list[Discovery]] = {method: [] for method in ttc.methods}
    # One engine for the whole run, except the transformers engine, which generates with its trainer's own model.
    reuse = engine_factory is None and not ENGINES.get(config.rollout.engine).generates_with_policy
    engine: RolloutEngine | None = None
    done, total = 0, len(problems) * len(ttc.methods)
    if progress is not None:
        progress(done, total, None)
    try:
        for i, problem in enumerate(problems):
            for method in ttc.methods:
                found, used = solve(config, env, problem, method, engine_factory() if engine_factory else engine)
                if reuse:
                    engine = used
                else:
                    used.close()
                results[method].append(found)
                outcome = f"solved at attempt {found.solved_at}" if found.solved_at else f"unsolved after {found.attempts}"
                log.log(logging.DEBUG if progress else logging.INFO, "question %d/%d (%s) %s: %s", i + 1,
                        len(problems), problem.id, method, outcome)
                done += 1
                if progress is not None:
                    progress(done, total, found)
    finally:
        if engine is not None:
            engine.close()
    ks = sorted({k for k in (1, 16, 64, 256, 1024, ttc.budget) if k <= ttc.budget})
    return {
        "env": config.env.name,
        "split": ttc.split,
        "model": config.model.name_or_path,
        "budget": ttc.budget,
        "rollouts_per_step": config.rollout.num_generations,
        "num_questions": len(problems),
        "discovery": {method: {k: discovery_at(found, k) for k in ks} for method, found in results.items()},
        "questions": {method: [asdict(r) for r in found] for method, found in results.items()},
    }
