"""Run a program on a problem's tests in the sandbox and turn what happened into one `TestOutcome` per test.

Three kinds of tests (the `mode` of a code problem, see sdpo/envs/code/env.py for the data layout):

Each program gets one sandbox run of harness.py, which runs all tests of that program:

- `stdin`: a forked child per test with the input on stdin; its stdout is compared here, so expected outputs never
  enter the sandbox.
- `call`: the harness calls the function on each test's arguments and sends back the return values; they are
  compared here with the expected values (which never enter the sandbox either).
- `assert`: the harness executes each of the data set's assert statements.

A runtime error or limit ends the run when `stop_on_error` is set (the remaining tests count as not run), as in
LiveCodeBench and LeetCode; a wrong answer does not, so that feedback can pick the shortest failing cases.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
import json
import signal
from pathlib import Path
import traceback
from typing import Any

from sdpo.envs.code.feedback import TestOutcome
from sdpo.envs.code.harness import encode
from sdpo.envs.code.sandbox import RunResult, Sandbox, SandboxLimits
from sdpo.envs.code.values import decode, show, stdout_matches, values_match

_HARNESS_STARTUP_S = 1.5  # interpreter start plus the program's import, on top of the per-test limits
_OUTPUT_SLACK_BYTES = 64 * 1024  # stdin tests: output allowed beyond twice the expected output
_RECORD_SLACK_BYTES = 16 * 1024  # per record: JSON keys, the stderr tail
_MISSING = object()


@dataclass(frozen=True)
class ExecutionLimits:
    time_limit_s: float = 6.0  # per test (the paper's LiveCodeBench limit)
    total_time_s: float = 60.0  # all tests of one program together
    memory_mb: int = 1024
    processes: int = 32
    stop_on_error: bool = True

    def sandbox(self, wall_s: float) -> SandboxLimits:
        return SandboxLimits(wall_s=wall_s, memory_mb=self.memory_mb, processes=self.processes)


@lru_cache(maxsize=1)
def harness_source() -> str:
    return Path(__file__).with_name("harness.py").read_text()


def compile_error(program: str) -> str | None:
    """The SyntaxError text, checked here (compiling runs no code) so that it never costs a sandbox run."""
    try:
        compile(program, "solution.py", "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: NUL bytes in the source
        return "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
    return None


def run_tests(
    sandbox: Sandbox, program: str, data: dict[str, Any], tests: list[dict], limits: ExecutionLimits,
    expected: list[Any] | None = None,
) -> list[TestOutcome]:
    """Outcomes for `tests` (a split's visible tests). `expected` overrides the tests' own expected values."""
    return _run_harness(sandbox, program, data, tests, limits, expected)


def reference_values(sandbox: Sandbox, data: dict[str, Any], tests: list[dict], limits: ExecutionLimits) -> list[Any]:
    """Return values of the data set's reference solution (EvalPlus stores inputs only); _MISSING where it failed."""
    _, records = _harness_run(sandbox, data["reference"], data, tests, replace(limits, stop_on_error=False))
    values = [_MISSING] * len(tests)
    for i, record in records.items():
        if isinstance(i, int) and record.get("status") == "returned":
            values[i] = decode(record["value"])
    return values


def is_missing(value: Any) -> bool:
    return value is _MISSING


# ---------------------------------------------------------------------------------------------------------------


def _run_harness(
    sandbox: Sandbox, program: str, data: dict, tests: list[dict], limits: ExecutionLimits, expected: list | None
) -> list[TestOutcome]:
    run, records = _harness_run(sandbox, program, data, tests, limits)
    load = records.pop("load", None)
    shown = [(t.get("input", ""), t.get("expected", t.get("output", ""))) for t in tests]
    if expected is not None:
        shown = [(inp, show(value)) for (inp, _), value in zip(shown, expected)]
    if not tests:
        return []
    if load is None or load["status"] != "ok":  # the program failed before the first test
        if load is None:
            status, error = _limit_status(run), _error_text(run)
        else:
            status, error = ("time_limit", "") if load["status"] == "timeout" else ("runtime_error", load.get("error", ""))
        return _fill_not_run([TestOutcome(0, status, *shown[0], error=error)], tests)
    starts = records.pop("starts")
    outcomes = []
    for i, test in enumerate(tests):
        record = records.get(i)
        if record is None:
            if i in starts:  # the sandbox died or was killed inside this test
                status = _limit_status(run)
                error = _error_text(run) or "the program exited while the test was running"
                outcomes.append(TestOutcome(i, status, *shown[i], error=error))
            break
        want = expected[i] if expected is not None else test.get("expected_value", test.get("output", _MISSING))
        outcomes.append(_harness_outcome(i, record, shown[i], want, data))
    return _fill_not_run(outcomes, tests)


def _harness_outcome(i: int, record: dict, shown: tuple[str, str], want: Any, data: dict) -> TestOutcome:
    status = record.get("status")
    if status == "exited":  # stdin mode: the program's exit code, stdout and stderr tail for this test
        return _exited_outcome(i, record, shown, want, data.get("compare", {}).get("numeric_tokens", False))
    if status == "returned":
        actual = decode(record.get("value"))
        compare = data.get("compare", {})
        ok = values_match(actual, want, compare.get("atol", 0.0), compare.get("strict_types", False))
        return TestOutcome(i, "passed" if ok else "wrong_answer", *shown, output=show(actual))
    if status in ("passed", "failed"):
        verdict = "passed" if status == "passed" else "wrong_answer"
        return TestOutcome(i, verdict, *shown, output=record.get("shown", ""))
    mapped = {"timeout": "time_limit", "memory": "memory_limit"}.get(status, "runtime_error")
    return TestOutcome(i, mapped, *shown, error=record.get("error", ""))


def _exited_outcome(i: int, record: dict, shown: tuple[str, str], want: str, numeric_tokens: bool) -> TestOutcome:
    code, stdout, stderr = record.get("code"), str(record.get("stdout", "")), str(record.get("stderr", "")).strip()
    if code == 0:
        status = "passed" if stdout_matches(stdout, want, numeric_tokens) else "wrong_answer"
        return TestOutcome(i, status, *shown, output=stdout)
    if code == -signal.SIGXCPU:
        return TestOutcome(i, "time_limit", *shown, output=stdout, error="CPU time limit")
    if code == -signal.SIGXFSZ:  # stdout, stderr and files share one size limit in a stdin test
        exceeded, limit = record.get("exceeded", "stdout"), record.get("limit_bytes")
        if exceeded == "stdout":
            return TestOutcome(i, "output_limit", *shown, error="the program printed far more than the expected output")
        if exceeded == "stderr":
            return TestOutcome(i, "output_limit", *shown, error=f"the program wrote more than {limit} bytes to stderr")
        error = f"File size limit exceeded: the program wrote a file larger than the limit of {limit} bytes"
        return TestOutcome(i, "runtime_error", *shown, output=stdout, error=error)
    if stderr.rsplit("\n", 1)[-1].startswith("MemoryError"):
        return TestOutcome(i, "memory_limit", *shown, output=stdout, error=stderr)
    reason = f"killed by signal {signal.Signals(-code).name}" if isinstance(code, int) and code < 0 else f"exit code {code}"
    return TestOutcome(i, "runtime_error", *shown, output=stdout, error=stderr or reason)


def _harness_run(
    sandbox: Sandbox, program: str, data: dict, tests: list[dict], limits: ExecutionLimits
) -> tuple[RunResult, dict]:
    spec = {
        "mode": data["mode"],
        "program": "solution.py",
        "setup": data.get("setup", ""),
        "func_name": data.get("func_name"),
        "candidate": data.get("candidate"),
        "prelude": data.get("prelude", ""),
        "tests": [_harness_test(data["mode"], t) for t in tests],
        "time_limit_s": limits.time_limit_s,
        "stop_on_error": limits.stop_on_error,
    }
    wall = min(limits.time_limit_s * (len(tests) + 1), limits.total_time_s) + _HARNESS_STARTUP_S
    files = {"solution.py": program, "harness.py": harness_source()}
    sandbox_limits = limits.sandbox(wall)
    if data["mode"] == "stdin":  # the records carry every test's output (JSON-escaped: up to twice the bytes)
        stdout_bytes = 2 * sum(t["output_cap"] for t in spec["tests"]) + _RECORD_SLACK_BYTES * (len(tests) + 1)
        sandbox_limits = replace(sandbox_limits, stdout_bytes=stdout_bytes)
    run = sandbox.run(files, "harness.py", json.dumps(spec), sandbox_limits)
    records: dict[Any, Any] = {"starts": set()}
    for line in run.stdout.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        event = record.get("event")
        if event == "load":
            records["load"] = record
        elif event == "start" and isinstance(record.get("i"), int):
            records["starts"].add(record["i"])
        elif event == "result" and isinstance(record.get("i"), int):
            records[record["i"]] = record
    return run, records


def _harness_test(mode: str, test: dict) -> dict:
    if mode == "stdin":
        # Room for twice the expected output: enough to show a wrong answer, small enough to stop a flood.
        return {"input": test["input"], "output_cap": 2 * len(test["output"].encode()) + _OUTPUT_SLACK_BYTES}
    if mode == "call":
        return {"args": encode(test["args"])}  # tagged JSON: tuples and complex numbers survive
    return {"source": test["source"]}


def _limit_status(run: RunResult) -> str:
    return {"timeout": "time_limit", "memory": "memory_limit", "output_limit": "output_limit"}.get(
        run.status, "runtime_error"
    )


def _error_text(run: RunResult) -> str:
    if run.status == "timeout":
        return ""
    return run.stderr.strip() or run.detail


def _fill_not_run(outcomes: list[TestOutcome], tests: list[dict]) -> list[TestOutcome]:
    for i in range(len(outcomes), len(tests)):
        test = tests[i]
        outcomes.append(TestOutcome(i, "not_run", test.get("input", ""), test.get("expected", test.get("output", ""))))
    return outcomes
