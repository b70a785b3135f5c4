"""Held-out evaluation the way papers report it: avg@k, pass@k (unbiased estimator) and maj@k."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import math
from typing import Any

from sdpo.envs.base import Environment, Problem
from sdpo.rollout.base import RolloutEngine, SamplingSettings


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
    """Sample `sampling.n` responses per problem and report avg@n, pass@k for each k <= n, maj@n, response length."""
    completions = engine.generate([render(p) for p in problems], sampling)
    n = sampling.n
    flat_problems = [problems[c.prompt_index] for c in completions]
    scores = env.score_batch(flat_problems, [c.text for c in completions], [c.truncated for c in completions])
    rewards = [[s.reward for s in scores[i * n : (i + 1) * n]] for i in range(len(problems))]
    correct = [[r >= success_threshold for r in row] for row in rewards]
    metrics = {
        f"{prefix}/avg@{n}": sum(map(sum, rewards)) / max(1, n * len(problems)),
        f"{prefix}/response_length": sum(len(c.token_ids) for c in completions) / max(1, len(completions)),
    }
    for k in sorted({k for k in ks if k <= n} | {n}):
        metrics[f"{prefix}/pass@{k}"] = sum(pass_at_k(n, sum(row), k) for row in correct) / max(1, len(problems))
    answers = [[s.info.get("answer") for s in scores[i * n : (i + 1) * n]] for i in range(len(problems))]
    if any(a is not None for row in answers for a in row):
        metrics[f"{prefix}/maj@{n}"] = sum(majority_correct(a, c) for a, c in zip(answers, correct)) / max(1, len(problems))
    return EvalResult(metrics, rewards)
