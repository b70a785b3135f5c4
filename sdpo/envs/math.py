"""Math RLVR: GSM8K, MATH-500 and MATH, answers checked for equivalence with `math-verify`.

- `gsm8k`: train 7473 / test 1319; gold = the number after `####`.
- `math500`: test = MATH-500 (500); train = the 4500 other MATH test problems (the PRM800K training pool).
- `math`: the 5000 MATH test problems; train = the 4500-problem pool, test = its MATH-500 rows, all = 5000.

The user message is the problem followed by `prompt_suffix` (reason step by step, final answer in \\boxed{}). The
response's answer is what math-verify extracts (the last \\boxed{} first, then the last expression); reward 1 iff
it is equivalent to the gold answer. Feedback: "format" (default) says when no answer could be found; "none" is
the scalar setting; "full" also says that the extracted answer is wrong (never the gold answer).
"""

from __future__ import annotations

from dataclasses import dataclass
import re
import threading

from sdpo.config import EnvConfig, check_choice
from sdpo.envs.base import ENVIRONMENTS, DataError, Environment, Problem, Score
from sdpo.envs.rows import data_file, get_field, read_jsonl

DEFAULT_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
NO_ANSWER_FEEDBACK = "No final answer found: put the final answer within \\boxed{}."
_TIMEOUT_S = 5  # math-verify's own limits on parsing and on sympy comparison (main thread only)


@dataclass
class MathEnvConfig(EnvConfig):
    _target_: str = "sdpo.envs.math.MathEnv"
    name: str = "math"
    prompt_suffix: str = DEFAULT_SUFFIX
    system_prompt: str | None = None
    feedback: str = "format"
    score_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("env.feedback", self.feedback, ["none", "format", "full"])


@dataclass
class GSM8KEnvConfig(MathEnvConfig):
    _target_: str = "sdpo.envs.math.GSM8KEnv"
    name: str = "gsm8k"


@dataclass
class Math500EnvConfig(MathEnvConfig):
    _target_: str = "sdpo.envs.math.Math500Env"
    name: str = "math500"


def _verify_timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_answer(text: str, gold: bool = False) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if gold:
        text = text if "\\boxed" in text else f"${text}$"
    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=_verify_timeout())


def verify_answer(response: str, gold: str) -> tuple[list, bool]:
    """(the response's parsed final answer, its `<think>` part dropped; whether math-verify finds it equivalent to
    `gold`). The gold answer is parsed only when the response has an answer."""
    from math_verify import verify

    predicted = parse_answer(response.rsplit("</think>", 1)[-1])
    if not predicted:
        return predicted, False
    parsed_gold = parse_answer(gold, gold=True)
    return predicted, bool(parsed_gold) and bool(verify(parsed_gold, predicted, timeout_seconds=_verify_timeout()))


class MathEnv(Environment):
    """Shared scoring; subclasses read their files into (id, problem, answer) rows."""

    config_class = MathEnvConfig
    scoring_mode = "process"  # sympy can take unbounded time on hostile expressions

    def rows(self, split: str) -> list[tuple[str, str, str]]:
        wanted = {self.config.train_split: "train", self.config.eval_split: "test"}.get(split, split)
        math_file = data_file(self.data_dir, "math/math_test5000.jsonl", "MATH test (5000)")
        if wanted not in ("train", "test", "all"):
            raise ValueError(f"{self.config.name} has splits 'train', 'test' and 'all', not {split!r}")
        rows = []
        for line, row in read_jsonl(math_file):
            in_500 = get_field(row, "in_math500", bool, math_file, line)
            if wanted == "all" or in_500 == (wanted == "test"):
                rows.append(self._math_row(row, math_file, line))
        return rows

    @staticmethod
    def _math_row(row: dict, path, line: int) -> tuple[str, str, str]:
        return (
            get_field(row, "unique_id", str, path, line),
            get_field(row, "problem", str, path, line),
            get_field(row, "answer", str, path, line),
        )

    def load(self, split: str) -> list[Problem]:
        cfg: MathEnvConfig = self.config  # type: ignore[assignment]
        problems = []
        for problem_id, question, answer in self.rows(split):
            messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
            messages.append({"role": "user", "content": question.strip() + cfg.prompt_suffix})
            problems.append(Problem(id=problem_id, messages=messages, data={"answer": answer}))
        limit = cfg.max_train_rows if split in ("train", cfg.train_split) else cfg.max_eval_rows
        return problems[:limit]

    def reference_response(self, problem: Problem) -> str:
        """The final answer in the form the checker reads (the probe's reference; env.reference_as_teacher_context)."""
        return f"The final answer is $\\boxed{{{problem.data['answer']}}}$."

    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
        level = self.config.feedback
        predicted, correct = verify_answer(response, problem.data["answer"])
        if not predicted:
            return Score(0.0, NO_ANSWER_FEEDBACK if level != "none" else "", {"status": "no_answer"})
        if correct:
            return Score(1.0, "", {"status": "correct"})
        shown = str(predicted[-1])[:100]
        feedback = f"The final answer {shown} is not correct." if level == "full" else ""
        return Score(0.0, feedback, {"status": "wrong_answer", "predicted": shown})


ENVIRONMENTS.register("math")(MathEnv)


@ENVIRONMENTS.register("math500")
class Math500Env(MathEnv):
    config_class = Math500EnvConfig

    def rows(self, split: str) -> list[tuple[str, str, str]]:
        wanted = {self.config.train_split: "train", self.config.eval_split: "test"}.get(split, split)
        if wanted != "test":  # train: the 4500-problem pool, as for `math`
            return super().rows(split)
        path, rows = self.read_rows("math500/test.jsonl", "MATH-500", "test")
        return [self._math_row(row, path, line) for line, row in rows]


@ENVIRONMENTS.register("gsm8k")
class GSM8KEnv(MathEnv):
    config_class = GSM8KEnvConfig

    def rows(self, split: str) -> list[tuple[str, str, str]]:
        wanted = {self.config.train_split: "train", self.config.eval_split: "test"}.get(split, split)
        if wanted not in ("train", "test"):
            raise ValueError(f"gsm8k has splits 'train' and 'test', not {split!r}")
        path, records = self.read_rows(f"gsm8k/{wanted}.jsonl", f"GSM8K {wanted}", wanted)
        rows = []
        for line, row in records:
            solution = get_field(row, "answer", str, path, line)
            match = re.search(r"####\s*(.+?)\s*$", solution)
            if match is None:
                raise DataError(path, line, "answer", "no final '#### <number>' line")
            rows.append((f"gsm8k/{wanted}/{line}", get_field(row, "question", str, path, line), match.group(1).replace(",", "")))
        return rows
