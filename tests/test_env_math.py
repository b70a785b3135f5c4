"""Math environments on real GSM8K / MATH-500 / MATH rows, with math-verify equivalence."""

from __future__ import annotations

import json

import pytest

from sdpo.envs import DataError, ENVIRONMENTS
from sdpo.envs.math import GSM8KEnv, GSM8KEnvConfig, Math500Env, Math500EnvConfig, MathEnv, MathEnvConfig


def test_split_sizes():
    assert [len(GSM8KEnv(GSM8KEnvConfig()).load(s)) for s in ("train", "test")] == [7473, 1319]
    assert [len(Math500Env(Math500EnvConfig()).load(s)) for s in ("train", "test")] == [4500, 500]
    math = MathEnv(MathEnvConfig())
    assert [len(math.load(s)) for s in ("train", "test", "all")] == [4500, 500, 5000]
    assert {p.id for p in math.load("test")} == {p.id for p in Math500Env(Math500EnvConfig()).load("test")}


def test_gsm8k_gold_and_equivalent_answers():
    env = GSM8KEnv(GSM8KEnvConfig())
    problem = env.load("test")[0]  # Janet's ducks: 18
    assert problem.data["answer"] == "18" and problem.messages[-1]["content"].endswith("within \\boxed{}.")
    assert env.score(problem, "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n\\boxed{18}").reward == 1.0
    assert env.score(problem, "She makes $18.00 a day, so \\boxed{\\$18.00}").reward == 1.0
    assert env.score(problem, "\\boxed{20}").reward == 0.0
    missing = env.score(problem, "I am not sure.")
    assert missing.reward == 0.0 and missing.info["status"] == "no_answer" and "\\boxed" in missing.feedback


@pytest.mark.parametrize("answer_text", ["\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\boxed{(3, \\pi/2)}"])
def test_math500_latex_equivalence(answer_text):
    env = Math500Env(Math500EnvConfig())
    problem = env.load("test")[0]  # polar coordinates of (0, 3)
    assert env.score(problem, f"So the point is {answer_text}.").reward == 1.0
    assert env.score(problem, "\\boxed{(3, \\pi)}").reward == 0.0


def test_every_math500_gold_answer_verifies_against_itself():
    env = Math500Env(Math500EnvConfig())
    problems = env.load("test")[::25]
    assert all(env.score(p, f"\\boxed{{{p.data['answer']}}}").reward == 1.0 for p in problems)


def test_scored_through_the_process_pool():
    env = ENVIRONMENTS.get("gsm8k")(GSM8KEnvConfig(score_workers=1))
    problems = env.load("test")[:2]
    scores = env.score_batch(problems, ["\\boxed{18}", "\\boxed{1}"], [False, False])
    assert [s.reward for s in scores] == [1.0, 0.0] and all("score_s" in s.info for s in scores)


def test_malformed_gsm8k_row(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:1: field 'answer': no final"):
        GSM8KEnv(GSM8KEnvConfig(data_dir=str(tmp_path))).load("test")
