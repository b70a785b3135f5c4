"""HumanEval (164 function-completion problems, assert-based `check(candidate)`).

The prompt (signature, docstring and any helper the problem defines) runs before the program, so a response may
give the whole function or rely on the prompt's imports. When `check` is a flat list of asserts, each assert is one
test (157 problems); otherwise (loops, local variables) the whole `check(candidate)` is a single test.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from sdpo.envs.base import ENVIRONMENTS, DataError
from sdpo.envs.code.env import CodeEnv, CodeEnvConfig, CodeTask
from sdpo.envs.code.extract import answer_instruction
from sdpo.envs.rows import data_file, get_field, read_jsonl

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. " + answer_instruction("function (with any imports it needs)")
)


@dataclass
class HumanEvalConfig(CodeEnvConfig):
    _target_: str = "sdpo.envs.code.humaneval.HumanEvalEnv"
    name: str = "humaneval"
    file: str = "humaneval/HumanEval.jsonl"


def assert_display(source: str) -> tuple[str, str]:
    """(input, expected) texts of `assert candidate(ARGS) == EXPECTED`, or (the assert, "") for other shapes."""
    try:
        test = ast.parse(source).body[0].test  # type: ignore[attr-defined]
    except (SyntaxError, IndexError, AttributeError):
        return source, ""
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
        call = test.left
        if isinstance(call, ast.Call) and call.args + call.keywords:
            args = ", ".join(ast.get_source_segment(source, a) or "" for a in [*call.args, *call.keywords])
            return args, ast.get_source_segment(source, test.comparators[0]) or ""
    return source, ""


def split_check(test_source: str, path, line: int) -> tuple[str, list[str]]:
    """(module code outside check, one source per test). The check body is split only when it is all asserts."""
    try:
        module = ast.parse(test_source)
    except SyntaxError as exc:
        raise DataError(path, line, "test", f"not valid Python ({exc.msg})") from None
    check = next((n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:
        raise DataError(path, line, "test", "has no `def check(candidate)`")
    if all(isinstance(s, ast.Assert) for s in check.body):
        prelude = "\n".join(ast.get_source_segment(test_source, n) or "" for n in module.body if n is not check)
        return prelude, [ast.get_source_segment(test_source, s) or "" for s in check.body]
    return test_source, ["assert check(candidate) is None"]


@ENVIRONMENTS.register("humaneval")
class HumanEvalEnv(CodeEnv):
    config_class = HumanEvalConfig

    def read_tasks(self) -> list[CodeTask]:
        cfg: HumanEvalConfig = self.config  # type: ignore[assignment]
        path, rows = self.read_rows(cfg.file, "HumanEval")
        tasks = []
        for line, row in rows:
            prompt = get_field(row, "prompt", str, path, line)
            prelude, sources = split_check(get_field(row, "test", str, path, line), path, line)
            tests = [dict(zip(("input", "expected"), assert_display(s)), source=s) for s in sources]
            tasks.append(
                CodeTask(
                    id=get_field(row, "task_id", str, path, line),
                    prompt=f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```",
                    mode="assert",
                    tests=tests,
                    reference=prompt + get_field(row, "canonical_solution", str, path, line),
                    setup=prompt,
                    candidate=get_field(row, "entry_point", str, path, line),
                    prelude=prelude,
                )
            )
        return tasks
