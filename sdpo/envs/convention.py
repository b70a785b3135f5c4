"""Arithmetic graded under an answer convention that the prompt does not state and the checker's feedback does.

The learning-from-feedback task: the question is plain ("What is 7 * 8?"), but the grader only accepts
answers written by a fixed convention, the way an autograder, a form field or an API does. A response in any other
form scores 0 and gets the checker's format message, which states the convention (never this question's answer).
A response in the right form with a wrong number is told that the number is wrong, not what it should be.

With `env.suggest=true` the format message also shows the response's own last number written by the convention, as
a lenient checker's "did you mean" does (a linter's suggested fix): the rule applied to this attempt. It is the
attempt's number, right or wrong, never the question's answer; a suggestion is right exactly when the attempt had
the right number in the wrong form.

Why this shape (measured in benchmarks/results/feedback_learning_cpu.md): SmolLM2-135M-Instruct almost never
writes the convention unprompted, so nearly every GRPO group has reward 0 everywhere and no advantage; the feedback
carries a rule that holds for every question, held-out ones included; and the rule is a matter of the first
tokens of the answer, which a 135M model can copy from its context.
"""

from __future__ import annotations

from dataclasses import dataclass
import re

from sdpo.config import ConfigError, check_choice
from sdpo.envs.arithmetic import ArithmeticEnv, ArithmeticEnvConfig, extract_last_number
from sdpo.envs.base import ENVIRONMENTS, Problem, Score

@dataclass(frozen=True)
class Convention:
    """How answers must be written: `pattern` matches a whole, stripped response and captures the number."""

    pattern: str
    form: str  # how a correct response is written; "{n}" marks the number
    # The checker's format message. It states the rule without an example number: in calibration SmolLM2-135M's
    # greedy teacher copied an example ("for example 17") verbatim into 3 of 3 answers.
    rule: str

    def parse(self, response: str) -> str | None:
        match = re.fullmatch(self.pattern, response.strip())
        return match.group("n") if match else None

    def write(self, number: int | str) -> str:
        return self.form.format(n=number)

    def format_feedback(self, suggestion: str | None = None) -> str:
        message = f"Format error: {self.rule}"
        if suggestion is None:
            return message
        return f"{message} Your response, written that way, would be: {self.write(suggestion)}"


_NUM = r"(?P<n>-?\d+)"
CONVENTIONS: dict[str, Convention] = {
    # The whole response is the number, nothing else (a numeric form field).
    "bare": Convention(rf"{_NUM}\.?", "{n}",
                       "the grader reads only the bare number as the whole response: no words, no equation."),
    # A fixed key before the number (a line-oriented grader).
    "answer_prefix": Convention(rf"Answer:\s*{_NUM}\.?", "Answer: {n}",
                                "the grader reads only a response that is 'Answer:' followed by the number, "
                                "nothing else."),
    # A fixed unit after the number.
    "unit": Convention(rf"{_NUM} points\.?", "{n} points",
                       "scores are in points: the response must be the number followed by the word 'points', "
                       "nothing else."),
}


@dataclass
class ConventionEnvConfig(ArithmeticEnvConfig):
    _target_: str = "sdpo.envs.convention.ConventionEnv"
    name: str = "convention"
    # Which answer convention the grader enforces (CONVENTIONS).
    convention: str = "bare"
    # The question without any format instruction: the convention is the grader's to state, in its feedback.
    prompt_template: str = "What is {a} {op} {b}?"
    # The checker's messages (off: a scalar-only grader, the same task without the text to learn from).
    feedback: bool = True
    # The format message also shows the response's own last number in the accepted form (the attempt's number, not
    # the answer): the rule applied to this attempt, which a small model can copy where it cannot follow the rule.
    suggest: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("env.convention", self.convention, list(CONVENTIONS))
        if "{a}" not in self.prompt_template or "{b}" not in self.prompt_template:
            raise ConfigError("env.prompt_template must contain {a} and {b} (and may contain {op})")


@ENVIRONMENTS.register("convention")
class ConventionEnv(ArithmeticEnv):
    config_class = ConventionEnvConfig

    @property
    def convention(self) -> Convention:
        return CONVENTIONS[self.config.convention]

    def reference_response(self, problem: Problem) -> str:
        """A correct response: what the probe (scripts/probe.py) scores the teacher on."""
        return self.convention.write(problem.data["answer"])

    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
        feedback_on = self.config.feedback
        number = self.convention.parse(response)
        if number is None:
            own = extract_last_number(response) if self.config.suggest else None
            suggestion = None if own is None else (str(int(own)) if own.is_integer() else repr(own))
            feedback = self.convention.format_feedback(suggestion) if feedback_on else ""
            return Score(0.0, feedback, {"status": "format_error", "suggested": suggestion})
        if int(number) == problem.data["answer"]:
            return Score(1.0, "", {"status": "correct", "answer": int(number)})
        feedback = "Wrong answer: the format is right, but the number is not the result." if feedback_on else ""
        return Score(0.0, feedback, {"status": "wrong_answer", "answer": int(number)})
