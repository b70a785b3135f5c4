"""MBPP (assert tests, the data set's own train/test/validation/prompt splits) and MBPP+ (EvalPlus inputs).

MBPP: each assert of `test_list` is one test; `test_setup_code` / `test_imports` run after the program (they may
use its classes). The prompt shows the first assert, which names the function (as EvalPlus does).

MBPP+: function-call tests on `base_input` + `plus_input`. The data stores no expected outputs, so, as EvalPlus
does, they come from running `canonical_solution` on each input (in the sandbox, once per worker and problem);
inputs on which the reference fails are dropped. JSON has no tuples or complex numbers: inputs take the types of
the prompt's example call (`conform`). Comparison keeps tuple and list apart and uses `atol`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from sdpo.config import check_choice
from sdpo.envs.base import ENVIRONMENTS, DataError
from sdpo.envs.code.env import CodeEnv, CodeEnvConfig, CodeTask
from sdpo.envs.code.extract import answer_instruction
from sdpo.envs.code.humaneval import assert_display
from sdpo.envs.rows import data_file, get_field, read_jsonl

MBPP_INSTRUCTION = answer_instruction("function")
# The data set's split by task_id (its README): 1-10 few-shot prompts, 11-510 test, 511-600 validation, rest train.
MBPP_SPLITS = ((10, "prompt"), (510, "test"), (600, "validation"), (10**9, "train"))


@dataclass
class MBPPConfig(CodeEnvConfig):
    _target_: str = "sdpo.envs.code.mbpp.MBPPEnv"
    name: str = "mbpp"
    # "full" (974 problems, mbpp.jsonl) or "sanitized" (427 hand-checked problems).
    variant: str = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("env.variant", self.variant, ["full", "sanitized"])


@dataclass
class MBPPPlusConfig(CodeEnvConfig):
    _target_: str = "sdpo.envs.code.mbpp.MBPPPlusEnv"
    name: str = "mbppplus"
    file: str = "mbppplus/MbppPlus.jsonl"
    # False: only the original MBPP inputs (`base_input`).
    plus_inputs: bool = True


def mbpp_split(task_id: int) -> str:
    return next(name for last, name in MBPP_SPLITS if task_id <= last)


@ENVIRONMENTS.register("mbpp")
class MBPPEnv(CodeEnv):
    config_class = MBPPConfig

    def read_tasks(self) -> list[CodeTask]:
        cfg: MBPPConfig = self.config  # type: ignore[assignment]
        relative = "mbpp/mbpp.jsonl" if cfg.variant == "full" else "mbpp/sanitized-mbpp.jsonl"
        path, rows = self.read_rows(relative, f"MBPP ({cfg.variant})")
        text_field = "text" if cfg.variant == "full" else "prompt"
        tasks = []
        for line, row in rows:
            task_id = get_field(row, "task_id", int, path, line)
            asserts = get_field(row, "test_list", list, path, line)
            if not asserts or not all(isinstance(a, str) for a in asserts):
                raise DataError(path, line, "test_list", "expected a non-empty list of assert strings")
            if cfg.variant == "full":
                prelude = get_field(row, "test_setup_code", str, path, line, default="")
            else:
                prelude = "\n".join(get_field(row, "test_imports", list, path, line, default=[]))
            text = get_field(row, text_field, str, path, line).strip()
            tasks.append(
                CodeTask(
                    id=f"mbpp/{task_id}",
                    prompt=f"{text}\nYour code should pass this test:\n\n{asserts[0]}\n\n{MBPP_INSTRUCTION}",
                    mode="assert",
                    tests=[dict(zip(("input", "expected"), assert_display(a)), source=a) for a in asserts],
                    reference=get_field(row, "code", str, path, line),
                    prelude=prelude,
                    split=mbpp_split(task_id),
                )
            )
        return tasks


@ENVIRONMENTS.register("mbppplus")
class MBPPPlusEnv(CodeEnv):
    config_class = MBPPPlusConfig

    def read_tasks(self) -> list[CodeTask]:
        cfg: MBPPPlusConfig = self.config  # type: ignore[assignment]
        path, rows = self.read_rows(cfg.file, "MBPP+")
        tasks = []
        for line, row in rows:
            inputs = get_field(row, "base_input", list, path, line)
            if cfg.plus_inputs:
                plus = get_field(row, "plus_input", (list, dict), path, line, default=[])
                if plus == {}:  # one upstream row (Mbpp/793) stores "no extra inputs" as {}
                    plus = []
                if not isinstance(plus, list):
                    raise DataError(path, line, "plus_input", "expected a list of argument lists")
                inputs = inputs + plus
            for k, args in enumerate(inputs):
                if not isinstance(args, list):
                    raise DataError(path, line, f"inputs[{k}]", "expected a list of arguments")
            atol = get_field(row, "atol", (int, float), path, line, default=0)
            prompt = get_field(row, "prompt", str, path, line).strip().strip('"').strip()
            entry_point = get_field(row, "entry_point", str, path, line)
            example = example_arguments(prompt, entry_point)
            if example:
                inputs = [[conform(value, node) for value, node in zip(args, example)] + args[len(example):] for args in inputs]
            tasks.append(
                CodeTask(
                    id=get_field(row, "task_id", str, path, line),
                    prompt=f"{prompt}\n\n{MBPP_INSTRUCTION}",
                    mode="call",
                    tests=[{"args": args, "input": _show_args(args)} for args in inputs],
                    reference=get_field(row, "canonical_solution", str, path, line),
                    func_name=entry_point,
                    compare={"atol": float(atol), "strict_types": True},
                    expected_from_reference=True,
                )
            )
        return tasks


def example_arguments(prompt: str, entry_point: str) -> list[ast.expr]:
    """The positional arguments of the prompt's example call `entry_point(...)` (its assert), as syntax trees."""
    try:
        tree = ast.parse("\n".join(line for line in prompt.splitlines() if line.lstrip().startswith("assert")))
    except SyntaxError:
        return []
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == entry_point]
    return list(calls[0].args) if calls else []


def conform(value: Any, example: ast.expr) -> Any:
    """JSON cannot hold tuples or complex numbers: give an input the types of the prompt's example argument.

    (EvalPlus stores `(9, 10)` as `[9, 10]` and `1j` as `"1j"`; the reference, e.g. `test_tup + tuple(xs)`,
    needs the real types.) Lists follow their first example element; anything unclear is left as it is.
    """
    if isinstance(example, ast.Tuple) and isinstance(value, list):
        shapes = example.elts or [None]
        return tuple(conform(v, shapes[min(i, len(shapes) - 1)]) if shapes[0] is not None else v for i, v in enumerate(value))
    if isinstance(example, ast.List) and isinstance(value, list) and example.elts:
        return [conform(v, example.elts[0]) for v in value]
    if isinstance(value, str) and _is_number(example):
        try:
            number = complex(value)
        except ValueError:
            return value
        return number if number.imag or "j" in value else (int(number.real) if number.real.is_integer() and "." not in value else number.real)
    return value


def _is_number(node: ast.expr | None) -> bool:
    if isinstance(node, ast.UnaryOp):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) in (int, float, complex)


def _show_args(args: list) -> str:
    return ", ".join(map(repr, args))
