"""The convention environment (sdpo/envs/convention.py): scoring under each convention, the checker's feedback,
disjoint splits, malformed output and config errors."""

from __future__ import annotations

import pytest

from sdpo import load_config
from sdpo.config import ConfigError
from sdpo.envs import build_environment
from sdpo.envs.convention import CONVENTIONS, ConventionEnv, ConventionEnvConfig


def env_with(**fields) -> ConventionEnv:
    return ConventionEnv(ConventionEnvConfig(**fields))


def test_the_question_does_not_state_the_convention():
    problem = env_with().load("train")[0]
    a, b = problem.id.split("*")
    assert problem.question == f"What is {a} * {b}?"
    assert problem.data["answer"] == int(a) * int(b)


def test_splits_are_disjoint_and_cover_all_pairs():
    env = env_with()
    train, test = env.load("train"), env.load("test")
    assert len(train) == 61 and len(test) == 20
    assert not {p.id for p in train} & {p.id for p in test}
    assert env_with().load("test") == test  # seeded: the same held-out set every time
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        env.load("validation")


@pytest.mark.parametrize("name, right, wrong_form", [
    ("answer_prefix", "Answer: {n}", "The answer is {n}."),
    ("bare", "{n}", "{n} is the answer"),
    ("unit", "{n} points", "Answer: {n}"),
])
def test_scoring_under_each_convention(name, right, wrong_form):
    env = env_with(convention=name)
    problem = env.load("train")[0]
    n = problem.data["answer"]
    assert env.score(problem, right.format(n=n)).reward == 1.0
    assert env.score(problem, "  " + right.format(n=n) + ".\n").reward == 1.0  # whitespace, a final full stop
    assert env.reference_response(problem) == right.format(n=n)
    assert env.score(problem, env.reference_response(problem)).reward == 1.0

    wrong_number = env.score(problem, right.format(n=n + 1))
    assert (wrong_number.reward, wrong_number.info["status"]) == (0.0, "wrong_answer")
    assert "number is not the result" in wrong_number.feedback and str(n) not in wrong_number.feedback

    wrong_form_score = env.score(problem, wrong_form.format(n=n))
    assert (wrong_form_score.reward, wrong_form_score.info["status"]) == (0.0, "format_error")
    # The format message states the convention, with no number in it (no answer, no example to copy).
    assert wrong_form_score.feedback == "Format error: " + CONVENTIONS[name].rule
    assert not any(ch.isdigit() for ch in wrong_form_score.feedback)


@pytest.mark.parametrize("response", ["", "   ", "Answer:", "Answer: seven", "Answer: 5 and Answer: 6", "5 * 7 = 35", "\u00e9\u0000"])
def test_malformed_output_is_a_format_error(response):
    score = env_with(convention="answer_prefix").score(env_with().load("train")[0], response)
    assert score.reward == 0.0 and score.info["status"] == "format_error" and score.feedback.startswith("Format error")


def test_the_same_feedback_for_every_question():
    """The feedback is a rule, not a per-question hint: what a held-out question can use too."""
    env = env_with()
    messages = {env.score(p, "I think it is 3").feedback for p in env.load("train") + env.load("test")}
    assert len(messages) == 1


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_suggestion_is_the_attempts_own_number_in_the_convention(name):
    """env.suggest: the format message shows the attempt's last number written by the convention: the answer only
    when the attempt had it, a wrong number when the attempt did; none when the attempt had no number."""
    env = env_with(convention=name, suggest=True)
    problem = env.load("train")[0]
    n = problem.data["answer"]
    right = env.score(problem, f"{problem.question} The result is {n}")
    assert right.feedback.startswith("Format error: " + CONVENTIONS[name].rule)
    assert right.feedback.endswith("would be: " + CONVENTIONS[name].write(n)) and right.info["suggested"] == str(n)
    wrong = env.score(problem, f"I get {n + 1000}.")
    assert wrong.feedback.endswith(CONVENTIONS[name].write(n + 1000)) and str(n) not in wrong.feedback.replace(str(n + 1000), "")
    none = env.score(problem, "no idea")
    assert none.feedback == "Format error: " + CONVENTIONS[name].rule and none.info["suggested"] is None
    # Without the option the message is the rule alone, whatever the attempt.
    assert env_with(convention=name).score(problem, f"The result is {n}").feedback == "Format error: " + CONVENTIONS[name].rule


def test_scalar_only_grader_gives_no_text():
    env = env_with(feedback=False)
    problem = env.load("train")[0]
    assert env.score(problem, "hello").feedback == ""
    assert env.score(problem, f"{problem.data['answer'] + 1}").feedback == ""


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="env.convention"):
        ConventionEnvConfig(convention="json")
    with pytest.raises(ConfigError, match="env.prompt_template"):
        ConventionEnvConfig(prompt_template="What is it?")


def test_env_option_and_preset_compose():
    config = load_config(["experiment=convention_cpu", "model=tiny"])
    assert config.env.name == "convention" and config.algorithm.name == "sdpo"
    assert isinstance(build_environment(config.env), ConventionEnv)
