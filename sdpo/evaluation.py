"""Held-out evaluation the way papers report it: avg@k, pass@k (unbiased estimator) and maj@k."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import math
from pathlib import Path
from typing import Any

from sdpo.envs.base import Environment, Problem
from sdpo.rollout.base import RolloutEngine, SamplingSettings
from sdpo.rollout.episodes import EpisodeLimits, EpisodeRollout, episode_metrics, rendered_prompts, run_episodes


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct).

    The unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), computed as a stable product.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_correct(answers: Sequence[Any], correct: Sequence[bool]) -> float:
    """1 if the most frequent answer (ties broken by first appearance) is a correct one, else 0.

    `answers` are the extracted answers (None for no answer; never counted as a vote).
    """
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    best = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == best)
    return float(any(ok for a, ok in zip(answers, correct) if a == winner))


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rewards: list[list[float]]  # [question][sample]


def evaluate(
    engine: RolloutEngine,
    env: Environment,
    problems: Sequence[Problem],
    render: Callable[[Problem], list[int]],
    sampling: SamplingSettings,
    ks: Sequence[int] = (1,),
    success_threshold: float = 1.0,
    prefix: str = "eval",
) -> EvalResult:
    """Sample `sampling.n` responses per problem (one-turn episodes) and report avg@n, pass@k for each k <= n, maj@n,
    response length.

    No problems (a dataset without held-out data): no metrics, rather than zeros that read as a score."""
    if not problems:
        return EvalResult({}, [])
    rollout = run_episodes(engine, env, None, problems, [render(p) for p in problems], sampling,
                           EpisodeLimits.one_turn(success_threshold))
    return answer_metrics(rollout, ks, success_threshold, prefix)


def answer_metrics(rollout: EpisodeRollout, ks: Sequence[int], success_threshold: float, prefix: str) -> EvalResult:
    """avg@n, pass@k for each k <= n, maj@n (where the environment extracts answers) and the response length of
    one-turn episodes, n per question."""
    n, questions = rollout.episodes_per_question, len(rollout.episodes) // max(rollout.episodes_per_question, 1)
    rows = rollout.rows
    rewards = [[r.result.reward for r in rows[i * n : (i + 1) * n]] for i in range(questions)]
    correct = [[r >= success_threshold for r in row] for row in rewards]
    metrics = {
        f"{prefix}/avg@{n}": sum(map(sum, rewards)) / max(1, n * questions),
        f"{prefix}/response_length": sum(len(r.completion.token_ids) for r in rows) / max(1, len(rows)),
    }
    for k in sorted({k for k in ks if k <= n} | {n}):
        metrics[f"{prefix}/pass@{k}"] = sum(pass_at_k(n, sum(row), k) for row in correct) / max(1, questions)
    answers = [[r.result.info.get("answer") for r in rows[i * n : (i + 1) * n]] for i in range(questions)]
    if any(a is not None for row in answers for a in row):
        metrics[f"{prefix}/maj@{n}"] = sum(majority_correct(a, c) for a, c in zip(answers, correct)) / max(1, questions)
    return EvalResult(metrics, rewards)


def episode_summary(rollout: EpisodeRollout, prefix: str) -> dict[str, float]:
    """Held-out episodes: avg@n of the first turn (the single-turn number) and success within max_turns turns."""
    batch, _ = rollout.batch()
    means = episode_metrics(batch, rollout.limits.success_threshold)
    return {f"{prefix}/avg@{rollout.episodes_per_question}": float(means["episode/first_turn_reward"]),
            f"{prefix}/episode_success": float(means["episode/success"]),
            f"{prefix}/episode_turns": float(means["episode/turns_mean"]),
            f"{prefix}/response_length": float(batch.response_lengths_B.mean())}


def format_table(metrics: dict[str, float], title: str = "") -> str:
    """A plain-text table of `name  value` rows, avg / pass / maj first."""
    order = {"avg": 0, "pass": 1, "maj": 2}

    def rank(name: str) -> tuple:
        kind, _, k = name.split("/")[-1].partition("@")
        return (order.get(kind, 3), int(k) if k.isdigit() else 0, name)

    names = sorted(metrics, key=rank)
    width = max(map(len, names), default=0)
    lines = [title] if title else []
    lines += [f"{name:<{width}}  {metrics[name]:.4f}" for name in names]
    return "\n".join(lines)


# What evaluate_checkpoint's `progress` hears: (stage, questions done, questions in all), stage "sampling" or "scoring".
Progress = Callable[[str, int, int], None]


def evaluated_model(config: Any) -> Any:
    """The model config scripts/eval.py evaluates: `model`, or with `trainer.resume` naming a checkpoint, that
    checkpoint as `model.name_or_path` (a trainer checkpoint holds HF weights or a LoRA adapter, and the tokenizer).

    trainer.resume may name a checkpoint directory (runs/<run>/checkpoints/step-000100), a run directory or its
    checkpoints/ (the newest complete checkpoint there); "auto" has no run to look in and is refused."""
    from dataclasses import replace

    from sdpo.checkpoint import latest_checkpoint
    from sdpo.models import is_adapter_dir

    resume = config.trainer.resume
    if resume in (None, "", "none"):
        return config.model
    if resume == "auto":
        raise ValueError("trainer.resume=auto continues a training run; to evaluate a checkpoint, name it: "
                         "trainer.resume=runs/<run>/checkpoints/step-000100 (or the run directory: its newest)")
    path = Path(resume).expanduser()
    if not ((path / "config.json").exists() or is_adapter_dir(path)):
        newest = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if newest is None:
            raise ValueError(f"trainer.resume={resume!r} is not a checkpoint (no config.json nor adapter_config.json) "
                             "nor a run directory with a complete checkpoint")
        path = newest
    return replace(config.model, name_or_path=str(path))


class _ChunkedEngine:
    """`engine.generate` in chunks of `size` prompts, each reported to `progress`: the same completions as one call
    (a chunk's seed is offset as the vLLM engine offsets each prompt's, seed + prompt index x n; the transformers
    engine samples from torch's generator in calls of `size` prompts anyway)."""

    def __init__(self, engine: RolloutEngine, size: int, progress: Progress) -> None:
        self.engine, self.size, self.progress = engine, size, progress

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Any]:
        from dataclasses import replace

        completions: list[Any] = []
        self.progress("sampling", 0, len(prompts))
        for start in range(0, len(prompts), self.size):
            chunk = prompts[start : start + self.size]
            seed = None if sampling.seed is None else sampling.seed + start * sampling.n
            for c in self.engine.generate(chunk, replace(sampling, seed=seed)):
                c.prompt_index += start
                completions.append(c)
            self.progress("sampling", start + len(chunk), len(prompts))
        return completions

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class _ChunkedScoring:
    """`env.score_batch` in chunks of `size` questions' samples, each reported to `progress`."""

    def __init__(self, env: Environment, size: int, n: int, progress: Progress) -> None:
        self.env, self.size, self.n, self.progress = env, size, n, progress

    def score_batch(self, problems: Sequence[Problem], responses: Sequence[str],
                    truncated: Sequence[bool]) -> list[Any]:
        questions, step = len(problems) // self.n, self.size * self.n
        scores: list[Any] = []
        self.progress("scoring", 0, questions)
        for start in range(0, len(problems), step):
            end = start + step
            scores += self.env.score_batch(problems[start:end], responses[start:end], truncated[start:end])
            self.progress("scoring", min(end, len(problems)) // self.n, questions)
        return scores

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


def _chunk_size(rollout: Any, questions: int, n: int) -> int:
    """Questions per progress step: one transformers `generate` call's worth; for vLLM about a twentieth of the
    questions, and enough sequences to keep its batch full (all of them when the engine sleeps between calls)."""
    from sdpo.rollout import ENGINES

    if ENGINES.get(rollout.engine).generates_with_policy:
        return max(1, rollout.hf_batch_size // n)
    if rollout.vllm.sleep_level:  # a sleeping engine would offload and reload its weights around every chunk
        return max(1, questions)
    return max(1, math.ceil(questions / 20), math.ceil(256 / n))


def evaluate_checkpoint(
    config: Any, env: Environment | None = None, engine: RolloutEngine | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate `config.model.name_or_path` (a trainer checkpoint, a LoRA adapter checkpoint or any local model; or
    the checkpoint `config.trainer.resume` names: `evaluated_model`) on the eval split of `config.env` with
    `config.eval`'s sampling: the report scripts/eval.py prints and writes.

    `progress(stage, done, total)`: called as the questions are sampled, then scored, in chunks (scripts/eval.py's
    progress bar); the samples are the same as without it."""
    import time

    import torch

    from sdpo.envs import build_environment
    from sdpo.models import DTYPES, load_model, load_tokenizer, resolve_checkpoint
    from sdpo.precision import resolve_precision
    from sdpo.rollout import ENGINES, EngineSource, build_engine

    resolve_precision(config)
    ecfg, rcfg = config.eval, config.rollout
    model_config = evaluated_model(config)
    torch.manual_seed(config.trainer.seed)  # the HF engine samples from torch's global generator
    path = resolve_checkpoint(model_config)
    tokenizer = load_tokenizer(path)
    env = env or build_environment(config.env)
    kept = rendered_prompts(tokenizer, env.load(config.env.eval_split), rcfg.max_prompt_len,
                            model_config.chat_template_kwargs)[: ecfg.num_questions]
    problems, prompts = [p for p, _ in kept], {id(p): ids for p, ids in kept}
    max_new_tokens = ecfg.max_new_tokens or rcfg.max_new_tokens
    if engine is None:
        model = load_model(model_config, path).eval()
        model_path = path
        if ENGINES.get(rcfg.engine).loads_checkpoint(rcfg) and (Path(path) / "adapter_config.json").exists():
            model_path = Path(path) / "merged"  # an engine of its own serves a plain checkpoint: the adapter merged
            model.save_pretrained(model_path)
            tokenizer.save_pretrained(model_path)
        engine = build_engine(rcfg, EngineSource(model, tokenizer, model_path, rcfg.max_prompt_len + max_new_tokens,
                                                 DTYPES.get(model_config.autocast_dtype)))
    sampling = SamplingSettings.from_config(rcfg, n=ecfg.samples_per_question, temperature=ecfg.temperature,
                                            top_p=ecfg.top_p, max_new_tokens=max_new_tokens, seed=config.trainer.seed)
    run_engine, run_env = engine, env
    if progress is not None:
        size = _chunk_size(rcfg, len(problems), sampling.n)
        run_engine = _ChunkedEngine(engine, size, progress)  # type: ignore[assignment]
        run_env = _ChunkedScoring(env, size, sampling.n, progress)  # type: ignore[assignment]
    start = time.perf_counter()
    result = evaluate(run_engine, run_env, problems, lambda p: prompts[id(p)], sampling, ks=ecfg.ks,
                      success_threshold=config.algorithm.reprompt.success_reward_threshold)
    return {
        "checkpoint": str(path),
        "env": config.env.name,
        "split": config.env.eval_split,
        "num_questions": len(problems),
        "samples_per_question": ecfg.samples_per_question,
        "sampling": {"temperature": ecfg.temperature, "top_p": ecfg.top_p, "max_new_tokens": max_new_tokens},
        "seconds": round(time.perf_counter() - start, 2),
        "metrics": result.metrics,
        "per_question": [{"id": p.id, "rewards": r} for p, r in zip(problems, result.rewards, strict=True)],
    }


def evaluate_policy(engine: RolloutEngine, env: Environment, tokenizer: Any, problems: Sequence[Problem],
                    prompt_ids: Sequence[list[int]], config: Any,
                    any_rank: Callable[[bool], bool] = bool, prefix: str = "eval") -> dict[str, float]:
    """The trainer's held-out evaluation of `problems` (rendered as `prompt_ids`) with the eval.* sampling settings,
    as episodes: avg@k / pass@k of single answers, or with rollout.max_turns > 1 success within the turn budget and
    the first turn's avg@k. `any_rank`: see `Distributed.any_rank`."""
    if not problems:
        return {}
    ecfg = config.eval
    sampling = SamplingSettings.from_config(config.rollout, n=ecfg.samples_per_question, temperature=ecfg.temperature,
                                            top_p=ecfg.top_p, max_new_tokens=ecfg.max_new_tokens,
                                            seed=config.trainer.seed + 7919)
    limits = EpisodeLimits.from_config(config)
    rollout = run_episodes(engine, env, tokenizer, problems, prompt_ids, sampling, limits, any_rank)
    if limits.max_turns > 1:
        return episode_summary(rollout, prefix)
    return answer_metrics(rollout, ecfg.ks, limits.success_threshold, prefix).metrics
