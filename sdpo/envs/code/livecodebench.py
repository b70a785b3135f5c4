"""LiveCodeBench in its own release format (code_generation_lite `test*.jsonl`): the paper's code environment.

Each row: `question_id`, `question_title`, `question_content`, `platform`, `contest_date` (ISO), `starter_code`,
`difficulty`, `public_test_cases` (JSON text), `private_test_cases` (JSON text, or base64 of zlib of a pickle of
the JSON text), `metadata` (JSON text; `func_name` for LeetCode problems). Tests are `{input, output, testtype}`:
"stdin" tests run the program on stdin (output lines also match when their tokens are equal as decimal numbers,
as in LiveCodeBench's grader); "functional" tests call `Solution().<func_name>` (or a top-level function) with one
JSON value per input line, after the LeetCode preamble (sdpo/envs/code/leetcode.py), and compare with the JSON
output.

The paper's window is 2025-02-01 to 2025-05-01 (131 problems of release v6); both ends inclusive. The release files
(about 1.3 GB) are not shipped in data/: read them from the hub (`env.hub`, as configs/experiment/livecodebench.yaml
does: the json builder over the repository's `test6.jsonl`, since `datasets` no longer runs the repository's loading
script), or point `env.path` at a local copy of the files.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
import datetime as dt
import io
import json
import pickle
import zlib
from pathlib import Path
from typing import Any

from sdpo.config import ConfigError
from sdpo.envs.base import ENVIRONMENTS, DataError
from sdpo.envs.code.env import CodeEnv, CodeEnvConfig, CodeTask
from sdpo.envs.code.extract import answer_instruction
from sdpo.envs.code.leetcode import FUNCTION_INSTRUCTION, LEETCODE_PREAMBLE
from sdpo.envs.rows import data_file, get_field, read_jsonl

HUB_HINT = (
    "env.hub.id=json env.hub.data_files=hf://datasets/livecodebench/code_generation_lite/test6.jsonl, "
    "as configs/experiment/livecodebench.yaml sets"
)
STDIN_FORMAT = (
    "Read the input from standard input and write the answer to standard output. " + answer_instruction("program")
)
CALL_FORMAT = "Complete the starter code below. " + FUNCTION_INSTRUCTION


@dataclass
class LiveCodeBenchConfig(CodeEnvConfig):
    _target_: str = "sdpo.envs.code.livecodebench.LiveCodeBenchEnv"
    name: str = "livecodebench"
    # A test*.jsonl file or a folder of them, relative to data_dir.
    path: str = "livecodebench"
    # Inclusive contest-date window (YYYY-MM-DD); None: no bound. Default: the paper's v6 window.
    contest_date_start: str | None = "2025-02-01"
    contest_date_end: str | None = "2025-05-01"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("contest_date_start", "contest_date_end"):
            value = getattr(self, key)
            if value is not None:
                try:
                    dt.date.fromisoformat(value)
                except ValueError:
                    raise ConfigError(f"env.{key}={value!r} is not a date like 2025-02-01") from None


class _StringsOnlyUnpickler(pickle.Unpickler):
    """LiveCodeBench pickles a plain string; refuse anything that would import and call code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test-case pickle")


def decode_test_cases(text: str) -> list[Any]:
    """Plain JSON text, or base64(zlib(pickle(JSON text))) as in LiveCodeBench's private tests."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    payload = _StringsOnlyUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(text)))).load()
    return json.loads(payload) if isinstance(payload, (str, bytes)) else payload


def contest_date(value: str) -> dt.date:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).date()


@ENVIRONMENTS.register("livecodebench")
class LiveCodeBenchEnv(CodeEnv):
    config_class = LiveCodeBenchConfig
    hub_hint = HUB_HINT

    def read_tasks(self) -> list[CodeTask]:
        cfg: LiveCodeBenchConfig = self.config  # type: ignore[assignment]
        if cfg.hub.id is not None:
            root = cfg.hub.id
            sources = [self.read_rows(cfg.path, "LiveCodeBench")]
        else:
            root = data_file(self.data_dir, cfg.path, "LiveCodeBench", self.hub_hint)
            sources = [(path, read_jsonl(path)) for path in (sorted(root.glob("*.jsonl")) if root.is_dir() else [root])]
        start = dt.date.fromisoformat(cfg.contest_date_start) if cfg.contest_date_start else None
        end = dt.date.fromisoformat(cfg.contest_date_end) if cfg.contest_date_end else None
        tasks, days = [], []
        for path, rows in sources:
            for line, row in rows:
                task = self._task(row, path, line)
                day = dt.date.fromisoformat(task.meta["contest_date"])
                days.append(day)
                if (start is None or day >= start) and (end is None or day <= end):
                    tasks.append(task)
        if days and not tasks:
            raise ConfigError(
                f"none of the {len(days)} problems in {root} falls in the contest-date window "
                f"env.contest_date_start={cfg.contest_date_start} .. env.contest_date_end={cfg.contest_date_end} "
                f"(the paper's); its contest dates run from {min(days)} to {max(days)}: set env.contest_date_start "
                f"and env.contest_date_end to cover them (null: no bound)"
            )
        return tasks

    def _task(self, row: dict, path: Path, line: int) -> CodeTask:
        try:
            day = contest_date(get_field(row, "contest_date", str, path, line))
        except ValueError:
            raise DataError(path, line, "contest_date", f"not an ISO date: {row['contest_date']!r}") from None
        cases = []
        for name in ("public_test_cases", "private_test_cases"):
            try:
                decoded = decode_test_cases(get_field(row, name, str, path, line, default="[]"))
            except Exception as exc:  # noqa: BLE001 - any decoding failure is a malformed row
                raise DataError(path, line, name, f"neither JSON nor base64+zlib+pickle JSON ({exc})") from None
            if not isinstance(decoded, list):
                raise DataError(path, line, name, "expected a list of test cases")
            cases += [(name, k, case) for k, case in enumerate(decoded)]
        if not cases:
            raise DataError(path, line, "public_test_cases", "the problem has no test case")
        kinds = {case.get("testtype") if isinstance(case, dict) else None for _, _, case in cases}
        if kinds == {"stdin"}:
            mode = "stdin"
        elif kinds == {"functional"}:
            mode = "call"
        else:
            raise DataError(path, line, "public_test_cases", f"testtype must be all 'stdin' or all 'functional', got {kinds}")
        tests = [self._test(mode, case, path, line, f"{name}[{k}]") for name, k, case in cases]
        metadata = json.loads(row.get("metadata") or "{}") if isinstance(row.get("metadata"), str) else row.get("metadata") or {}
        func_name = metadata.get("func_name")
        if mode == "call" and not func_name:
            raise DataError(path, line, "metadata", "functional tests need metadata.func_name")
        question = get_field(row, "question_content", str, path, line).strip()
        starter = get_field(row, "starter_code", str, path, line, default="")
        if mode == "call":
            prompt = f"{question}\n\n{CALL_FORMAT}\n\n```python\n{starter.rstrip()}\n```"
        else:
            prompt = f"{question}\n\n{STDIN_FORMAT}"
        return CodeTask(
            id=str(get_field(row, "question_id", (str, int), path, line)),
            prompt=prompt,
            mode=mode,
            tests=tests,
            setup=LEETCODE_PREAMBLE if mode == "call" else "",
            func_name=func_name,
            compare={"strict_types": False, "numeric_tokens": True},
            meta={"contest_date": day.isoformat(), "difficulty": row.get("difficulty"), "platform": row.get("platform")},
        )

    @staticmethod
    def _test(mode: str, case: dict, path: Path, line: int, where: str) -> dict:
        if not (isinstance(case.get("input"), str) and isinstance(case.get("output"), str)):
            raise DataError(path, line, where, "expected {input: str, output: str, testtype}")
        if mode == "stdin":
            return {"input": case["input"], "output": case["output"]}
        try:
            args = [json.loads(part) for part in case["input"].split("\n") if part.strip()]
            expected = json.loads(case["output"])
        except json.JSONDecodeError as exc:
            raise DataError(path, line, where, f"functional input/output must be JSON lines ({exc.msg})") from None
        return {"args": args, "expected_value": expected, "input": case["input"], "expected": case["output"]}
