"""Single-step arithmetic with an exact answer: the CPU default task.

Small enough that SmolLM2-135M-Instruct has a base pass rate between 20% and 60%, so that both GRPO and SDPO have
signal on this machine. Scalar reward (no feedback text by default): the teacher learns from sibling solutions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import itertools
import random
import re

from sdpo.config import ConfigError, EnvConfig, check_choice
from sdpo.envs.base import ENVIRONMENTS, Environment, Problem, Score

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class ArithmeticEnvConfig(EnvConfig):
    _target_: str = "sdpo.envs.arithmetic.ArithmeticEnv"
    name: str = "arithmetic"
    ops: list[str] = field(default_factory=lambda: ["*"])
    min_operand: int = 1
    max_operand: int = 9
    # A fixed, seeded share of all operand pairs is held out as the test split.
    eval_fraction: float = 0.25
    prompt_template: str = "What is {a} {op} {b}? Answer with just the number."
    system_prompt: str | None = None
    # Tell the teacher what went wrong ("no number" / "X is not correct"); off: the paper's scalar setting.
    feedback: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for op in self.ops:
            check_choice("env.ops[]", op, ["+", "-", "*"])
        if self.min_operand > self.max_operand:
            raise ConfigError("env.min_operand must not exceed env.max_operand")


def extract_last_number(text: str) -> float | None:
    matches = _NUMBER.findall(text.replace(",", ""))
    return float(matches[-1]) if matches else None


@ENVIRONMENTS.register("arithmetic")
class ArithmeticEnv(Environment):
    config_class = ArithmeticEnvConfig
    scoring_mode = "inline"  # one regex over a short string: nothing to time out

    def load(self, split: str) -> list[Problem]:
        cfg: ArithmeticEnvConfig = self.config  # type: ignore[assignment]
        operands = range(cfg.min_operand, cfg.max_operand + 1)
        items = list(itertools.product(cfg.ops, operands, operands))
        random.Random(cfg.seed).shuffle(items)
        n_eval = max(1, round(len(items) * cfg.eval_fraction))
        if split in ("test", cfg.eval_split):
            chosen = items[:n_eval]
        elif split in ("train", cfg.train_split):
            chosen = items[n_eval:]
        else:
            raise ValueError(f"arithmetic has splits 'train' and 'test', not {split!r}")
        limit = cfg.max_eval_rows if split in ("test", cfg.eval_split) else cfg.max_train_rows
        return [self._problem(op, a, b) for op, a, b in chosen[:limit]]

    def reference_response(self, problem: Problem) -> str:
        """A correct response (the probe's reference; env.reference_as_teacher_context)."""
        return str(problem.data["answer"])

    def _problem(self, op: str, a: int, b: int) -> Problem:
        cfg: ArithmeticEnvConfig = self.config  # type: ignore[assignment]
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        messages.append({"role": "user", "content": cfg.prompt_template.format(a=a, op=op, b=b)})
        return Problem(id=f"{a}{op}{b}", messages=messages, data={"answer": answer})

    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
        predicted = extract_last_number(response)
        answer = problem.data["answer"]
        if predicted is None:
            feedback = "The response contains no number: answer with just the number." if self.config.feedback else ""
            return Score(0.0, feedback, {"status": "no_answer"})
        if predicted == answer:
            return Score(1.0, "", {"status": "correct", "answer": predicted})
        feedback = f"{predicted:g} is not the correct answer." if self.config.feedback else ""
        return Score(0.0, feedback, {"status": "wrong_answer", "answer": predicted})

    def follow_up(self, problem: Problem, response: str, score: Score) -> str:
        """Multi-turn episodes (rollout.max_turns > 1): the feedback (env.feedback=true) or a bare "not correct",
        and another try."""
        return f"{score.feedback or 'That is not correct.'} Try again."

