"""The code environment: prompt, splits, scoring into (reward, LeetCode-style feedback). Data sets subclass it.

A data set module only turns its rows into `CodeTask`s (`read_tasks`). Everything else is shared:

- Splits (the paper's LiveCodeBench protocol, docs/algorithm.md §6): the train split sees a seeded random
  `train_test_fraction` (0.5) of each problem's tests, the eval split sees all of them. By default both splits hold
  the same problems; `heldout_problem_fraction` > 0 instead holds out a seeded share of problems for eval. Data
  sets with their own problem splits (MBPP) use those.
- Scoring: no complete ```python block -> 0 with "No code found"; a truncated response -> 0 with "Truncated
  Attempt" (its code is not run); otherwise the tests run in the sandbox, reward 1 only if all pass (or the
  fraction passed), and the feedback follows sdpo/envs/code/feedback.py.

`problem.data` layout: `mode` (stdin | call | assert), `tests` (this split's tests), `total_tests`, `reference`
(a correct program, for checks and benchmarks) and, per mode, `setup`, `func_name`, `candidate`, `prelude`,
`compare`, `expected_from_reference`. Tests: stdin {input, output}; call {args, expected_value, input, expected};
assert {source, input, expected} (`input`/`expected` are display texts for feedback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import hashlib
import random
from typing import Any, ClassVar

from omegaconf import MISSING

from sdpo.config import ConfigError, EnvConfig, check_choice, check_range
from sdpo.envs.base import Environment, Problem, Score
from sdpo.envs.code.execution import ExecutionLimits, compile_error, is_missing, reference_values, run_tests
from sdpo.envs.code.extract import extract_program
from sdpo.envs.code.feedback import NO_CODE_FEEDBACK, TRUNCATED_FEEDBACK, FeedbackLimits, TestOutcome, format_feedback
from sdpo.envs.code.sandbox import ISOLATIONS, Sandbox

_REFERENCE_CACHE: dict[str, tuple[list, list]] = {}  # per worker process: MBPP+ expected values by tests hash


@dataclass
class CodeEnvConfig(EnvConfig):
    _target_: str = MISSING
    name: str = MISSING
    # "all_pass": 1 only if every test of the split passes (the paper); "fraction": the share of tests passed.
    reward: str = "all_pass"
    # Share of each problem's tests that the train split sees (seeded per problem); the eval split sees all.
    train_test_fraction: float = 0.5
    # 0: train and eval hold the same problems (the paper's protocol); > 0: this seeded share is eval-only.
    heldout_problem_fraction: float = 0.0
    time_limit_s: float = 6.0  # per test (the paper's)
    total_time_limit_s: float = 60.0  # all tests of one response
    memory_mb: int = 1024
    max_processes: int = 32
    # A runtime error or limit stops the remaining tests (they count as failed), as LiveCodeBench does.
    stop_on_error: bool = True
    # "auto": bubblewrap if it works here, else the weaker process sandbox with a warning; "bwrap": require it.
    sandbox: str = "auto"
    sandbox_python: str | None = None  # interpreter for the programs (default: the trainer's base interpreter)
    sandbox_scratch_dir: str | None = None  # host folder for per-run staging (default: the system temp folder)
    system_prompt: str | None = None
    feedback_max_chars: int = 2000
    feedback_field_chars: int = 250
    feedback_input_lines: int = 8
    # The pool's per-sample timeout: a safety net above the sandbox's own limits.
    score_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("env.reward", self.reward, ["all_pass", "fraction"])
        check_choice("env.sandbox", self.sandbox, list(ISOLATIONS))
        check_range("env.train_test_fraction", self.train_test_fraction, 0.0, 1.0)
        check_range("env.heldout_problem_fraction", self.heldout_problem_fraction, 0.0, 1.0)
        check_range("env.time_limit_s", self.time_limit_s, 0.1)
        check_range("env.memory_mb", self.memory_mb, 64)
        check_range("env.max_processes", self.max_processes, 1)
        if self.train_test_fraction == 0.0:
            raise ConfigError("env.train_test_fraction=0 would train on no tests; use a value in (0, 1]")
        if self.score_timeout_s <= self.total_time_limit_s:
            raise ConfigError(
                f"env.score_timeout_s={self.score_timeout_s} must exceed env.total_time_limit_s="
                f"{self.total_time_limit_s}, so that the sandbox's own limits act first"
            )


@dataclass
class CodeTask:
    """One problem as a data set module reads it (see the module docstring for the test layout)."""

    id: str
    prompt: str
    mode: str
    tests: list[dict[str, Any]]
    reference: str | None = None
    setup: str = ""
    func_name: str | None = None
    candidate: str | None = None
    prelude: str = ""
    compare: dict[str, Any] = field(default_factory=dict)
    expected_from_reference: bool = False
    split: str | None = None  # the data set's own split, where it has one
    meta: dict[str, Any] = field(default_factory=dict)


def visible_tests(tests: list[dict], fraction: float, seed: int, problem_id: str) -> list[dict]:
    """A seeded random share of the tests (at least one), in their original order. Same result on every machine."""
    if fraction >= 1.0 or len(tests) <= 1:
        return list(tests)
    k = max(1, round(len(tests) * fraction))
    chosen = sorted(random.Random(f"{seed}:{problem_id}").sample(range(len(tests)), k))
    return [tests[i] for i in chosen]


class CodeEnv(Environment):
    config_class: ClassVar[type[EnvConfig]] = CodeEnvConfig
    scoring_mode: ClassVar[str] = "process"  # programs run in the process pool (sdpo/envs/pool.py)

    def read_tasks(self) -> list[CodeTask]:
        raise NotImplementedError

    # -- data --------------------------------------------------------------------------------------------------

    def load(self, split: str) -> list[Problem]:
        cfg: CodeEnvConfig = self.config  # type: ignore[assignment]
        tasks = self._split_tasks(self.read_tasks(), split)
        self.sandbox.isolation  # noqa: B018 - probed here: an unusable env.sandbox stops the run now (SandboxUnavailable)
        is_eval = split not in ("train", cfg.train_split)  # eval, and any other split, sees every test
        limit = cfg.max_eval_rows if is_eval else cfg.max_train_rows
        return [self._problem(task, train=not is_eval) for task in tasks[:limit]]

    def _split_tasks(self, tasks: list[CodeTask], split: str) -> list[CodeTask]:
        cfg: CodeEnvConfig = self.config  # type: ignore[assignment]
        wanted = {cfg.train_split: "train", cfg.eval_split: "test"}.get(split, split)
        own_splits = sorted({t.split for t in tasks if t.split is not None})
        if own_splits:
            chosen = [t for t in tasks if t.split == wanted] if wanted != "all" else tasks
            if not chosen:
                raise ValueError(f"{cfg.name} has splits {own_splits} (and 'all'), not {split!r}")
            return chosen
        if wanted not in ("train", "test", "all"):
            raise ValueError(f"{cfg.name} has splits 'train', 'test' and 'all', not {split!r}")
        if wanted == "all" or cfg.heldout_problem_fraction == 0.0:
            return tasks
        ids = sorted(t.id for t in tasks)
        random.Random(cfg.seed).shuffle(ids)
        heldout = set(ids[: round(len(ids) * cfg.heldout_problem_fraction)])
        return [t for t in tasks if (t.id in heldout) == (wanted == "test")]

    def _problem(self, task: CodeTask, train: bool) -> Problem:
        cfg: CodeEnvConfig = self.config  # type: ignore[assignment]
        tests = visible_tests(task.tests, cfg.train_test_fraction, cfg.seed, task.id) if train else task.tests
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        messages.append({"role": "user", "content": task.prompt})
        data = {
            "mode": task.mode, "tests": tests, "total_tests": len(task.tests), "reference": task.reference,
            "setup": task.setup, "func_name": task.func_name, "candidate": task.candidate,
            "prelude": task.prelude, "compare": task.compare, "expected_from_reference": task.expected_from_reference,
            **task.meta,
        }
        return Problem(id=task.id, messages=messages, data=data)

    # -- scoring -----------------------------------------------------------------------------------------------

    @property
    def sandbox(self) -> Sandbox:
        if getattr(self, "_sandbox", None) is None:
            cfg: CodeEnvConfig = self.config  # type: ignore[assignment]
            self._sandbox = Sandbox(cfg.sandbox, cfg.sandbox_python, cfg.sandbox_scratch_dir)
        return self._sandbox

    @property
    def limits(self) -> ExecutionLimits:
        cfg: CodeEnvConfig = self.config  # type: ignore[assignment]
        return ExecutionLimits(cfg.time_limit_s, cfg.total_time_limit_s, cfg.memory_mb, cfg.max_processes, cfg.stop_on_error)

    def reference_response(self, problem: Problem) -> str | None:
        """The dataset's reference program as a fenced answer (MBPP's code, HumanEval's prompt + canonical solution),
        or None where the dataset ships none: the probe's reference, env.reference_as_teacher_context."""
        reference = problem.data.get("reference")
        return f"```python\n{reference.strip()}\n```" if reference else None

    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
        if truncated:
            return Score(0.0, TRUNCATED_FEEDBACK, {"status": "truncated"})
        program = extract_program(response)
        if program is None:
            return Score(0.0, NO_CODE_FEEDBACK, {"status": "no_code"})
        return self.score_program(problem, program)

    def score_program(self, problem: Problem, program: str) -> Score:
        """Run `program` on the problem's tests (of its split) and grade it."""
        cfg: CodeEnvConfig = self.config  # type: ignore[assignment]
        data, tests, expected = problem.data, problem.data["tests"], None
        if data.get("expected_from_reference"):
            tests, expected = self._reference_expected(problem)
        error = compile_error(program)
        if error is not None:
            outcomes = [TestOutcome(0, "compile_error", error=error)]
        else:
            outcomes = run_tests(self.sandbox, program, data, tests, self.limits, expected)
        passed = sum(o.status == "passed" for o in outcomes)
        total = max(len(tests), 1)
        all_passed = error is None and passed == len(tests) and len(tests) > 0
        reward = (1.0 if all_passed else 0.0) if cfg.reward == "all_pass" else passed / total
        limits = FeedbackLimits(cfg.feedback_max_chars, cfg.feedback_field_chars, cfg.feedback_input_lines)
        feedback = "" if all_passed else format_feedback(outcomes, limits)
        # The status names what the feedback shows: a fatal case first, else the first wrong answer.
        failing = [o for o in outcomes if o.fatal] + [o for o in outcomes if o.status == "wrong_answer"]
        status = failing[0].status if failing else ("passed" if tests else "no_tests")
        info = {"status": status, "passed": passed, "total": len(tests), "isolation": self.sandbox.isolation}
        return Score(reward, feedback, info)

    def follow_up(self, problem: Problem, response: str, score: Score) -> str:
        """Multi-turn episodes: the judge's verdict on the submission (the feedback text, never the program's own
        output beyond what the feedback shows) and a request to resubmit."""
        return (f"Your submission was judged:\n\n{score.feedback}\n\n"
                "Fix the program and resubmit the complete solution in a ```python code block.")

    def _reference_expected(self, problem: Problem) -> tuple[list[dict], list[Any]]:
        """Tests and expected values from the reference solution; tests where the reference fails are dropped."""
        tests = problem.data["tests"]
        key = problem.id + ":" + hashlib.sha1(repr(tests).encode()).hexdigest()
        if key not in _REFERENCE_CACHE:
            values = reference_values(self.sandbox, problem.data, tests, self.limits)
            kept = [(t, v) for t, v in zip(tests, values) if not is_missing(v)]
            _REFERENCE_CACHE[key] = ([t for t, _ in kept], [v for _, v in kept])
        return _REFERENCE_CACHE[key]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_sandbox", None)  # re-created (and re-probed) in each worker
        return state
