"""pass@k against exact enumeration; maj@k; the evaluation loop on a scripted engine."""

from __future__ import annotations

from itertools import combinations
from math import comb

import pytest

from sdpo.evaluation import evaluate, majority_correct, pass_at_k
from sdpo.envs.arithmetic import ArithmeticEnv, ArithmeticEnvConfig
from sdpo.rollout.base import Completion, RolloutEngine, SamplingSettings


def enumerated_pass_at_k(outcomes: list[bool], k: int) -> float:
    subsets = list(combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_equals_exact_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(enumerated_pass_at_k(outcomes, k), abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_vote():
    assert majority_correct([12, 12, 7], [True, True, False]) == 1.0
    assert majority_correct([7, 12, 7], [False, True, False]) == 0.0
    assert majority_correct([None, None, 12], [False, False, True]) == 1.0  # no-answer never wins
    assert majority_correct([None], [False]) == 0.0


class ScriptedEngine(RolloutEngine):
    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, sampling):
        return [Completion(i // sampling.n, [1, 2], self.texts[i], False) for i in range(len(prompts) * sampling.n)]


def test_evaluate_reports_avg_pass_and_maj():
    env = ArithmeticEnv(ArithmeticEnvConfig())
    problems = env.load("test")[:2]
    answers = [p.data["answer"] for p in problems]
    texts = [str(answers[0]), str(answers[0]), "no idea", "0", "-1", str(answers[1] + 1)]
    result = evaluate(ScriptedEngine(texts), env, problems, lambda p: [1], SamplingSettings(n=3), ks=(1, 2))
    m = result.metrics
    assert m["eval/avg@3"] == pytest.approx(2 / 6)
    assert m["eval/pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["eval/pass@2"] == pytest.approx((1.0 + 0) / 2)
    assert m["eval/pass@3"] == pytest.approx(0.5)
    assert m["eval/maj@3"] == pytest.approx(0.5)
    assert result.rewards == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
