"""CodeContests subset (300 Codeforces problems, stdin/stdout): the local stand-in for LiveCodeBench v6.

Only the 224 problems whose reference passes every test with exact comparison are used by default
(`reference_passes_exact`); the others need a special checker (several correct outputs). The data carries no
reference programs, so `problem.data["reference"]` is None here.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdpo.envs.base import ENVIRONMENTS, DataError
from sdpo.envs.code.env import CodeEnv, CodeEnvConfig, CodeTask
from sdpo.envs.code.extract import answer_instruction
from sdpo.envs.rows import data_file, get_field, read_jsonl

STDIN_INSTRUCTION = (
    "Write a Python 3 program that reads the input from standard input and prints the answer to standard output. "
    + answer_instruction("program")
)


@dataclass
class CodeContestsConfig(CodeEnvConfig):
    _target_: str = "sdpo.envs.code.codecontests.CodeContestsEnv"
    name: str = "codecontests"
    file: str = "codecontests_subset/problems.jsonl"
    # False also loads the 76 problems whose outputs are not unique (exact comparison can fail correct programs).
    only_reference_passes: bool = True


@ENVIRONMENTS.register("codecontests")
class CodeContestsEnv(CodeEnv):
    config_class = CodeContestsConfig

    def read_tasks(self) -> list[CodeTask]:
        cfg: CodeContestsConfig = self.config  # type: ignore[assignment]
        path, rows = self.read_rows(cfg.file, "CodeContests subset")
        tasks = []
        for line, row in rows:
            if cfg.only_reference_passes and not get_field(row, "reference_passes_exact", bool, path, line):
                continue
            tests = []
            for k, test in enumerate(get_field(row, "tests", list, path, line)):
                if not (isinstance(test, dict) and isinstance(test.get("input"), str) and isinstance(test.get("output"), str)):
                    raise DataError(path, line, f"tests[{k}]", "expected {input: str, output: str}")
                tests.append({"input": test["input"], "output": test["output"]})
            if not tests:
                raise DataError(path, line, "tests", "empty")
            description = get_field(row, "description", str, path, line)
            tasks.append(
                CodeTask(
                    id=get_field(row, "id", str, path, line),
                    prompt=f"{description.strip()}\n\n{STDIN_INSTRUCTION}",
                    mode="stdin",
                    tests=tests,
                    meta={"difficulty": row.get("difficulty"), "title": row.get("title")},
                )
            )
        return tasks
