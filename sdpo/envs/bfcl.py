"""BFCL v4 single-turn function calling, scored by matching the call's syntax tree (an extra tool-use env).

The model answers with a Python-syntax list of calls, `[func(arg=value), other.func(x=1)]` (a ```python fence
and text around it are tolerated; the last list of calls counts). Reward 1 iff the calls match the ground truth:
same number of calls, each matched to a distinct expected call (order-free, for the parallel categories) with the
same function name, no argument the function does not have, every required argument present, and every given
argument value among the acceptable ones (an int is accepted for a float parameter; strings compare case- and
punctuation-insensitively; "" in the acceptable list means the argument may be left out). `irrelevance`: reward 1
iff no call is made.

Splits: BFCL is an evaluation set; `all` is the standard benchmark. `train`/`test` are a seeded partition
(`eval_fraction` of each category to test) for anyone who wants to train on part of it.

Feedback (`feedback`): "none"; "format" (default) says what is wrong without giving expected values (parse
errors, call count, unknown function, unexpected or missing argument: all visible in the prompt); "full" also
names the expected functions and the acceptable values.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
import json
import random
import re
from typing import Any

from sdpo.config import EnvConfig, check_choice, check_range
from sdpo.envs.base import ENVIRONMENTS, DataError, Environment, Problem, Score
from sdpo.envs.rows import data_file, get_field, read_jsonl

CATEGORIES = [
    "simple_python", "multiple", "parallel", "parallel_multiple",
    "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "irrelevance",
]
SYSTEM_PROMPT = (
    "You are an expert in composing function calls. You are given a question and a set of functions. Make one or "
    "more calls that achieve the purpose of the question. If no function applies, or the question lacks a required "
    "parameter, say so and make no call.\nWrite the calls as a Python list, with keyword arguments only, and "
    "nothing else in that part of the answer: [func_name1(param1=value1, param2=value2), func_name2(param=value)]\n"
    "Here are the functions, in JSON:\n{functions}"
)
_IGNORED_IN_STRINGS = re.compile(r"[\s,./\-_*^'\"]")


@dataclass
class BFCLEnvConfig(EnvConfig):
    _target_: str = "sdpo.envs.bfcl.BFCLEnv"
    name: str = "bfcl"
    folder: str = "bfcl"
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))
    eval_fraction: float = 0.5  # share of each category in the test split of the seeded partition
    feedback: str = "format"

    def __post_init__(self) -> None:
        super().__post_init__()
        for category in self.categories:
            check_choice("env.categories[]", category, CATEGORIES)
        check_choice("env.feedback", self.feedback, ["none", "format", "full"])
        check_range("env.eval_fraction", self.eval_fraction, 0.0, 1.0)


# -- parsing ---------------------------------------------------------------------------------------------------


class CallSyntaxError(ValueError):
    """The response's calls cannot be read; the message says why."""


def _dotted_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise CallSyntaxError(f"{ast.unparse(node)!r} is not a function name")


def _to_calls(node: ast.AST) -> list[tuple[str, dict[str, Any]]]:
    items = node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]
    calls = []
    for item in items:
        if not isinstance(item, ast.Call):
            raise CallSyntaxError(f"{ast.unparse(item)[:80]!r} is not a function call")
        name = _dotted_name(item.func)
        if item.args:
            raise CallSyntaxError(f"{name}: use keyword arguments only (param=value)")
        args = {}
        for keyword in item.keywords:
            if keyword.arg is None:
                raise CallSyntaxError(f"{name}: **kwargs is not allowed")
            try:
                args[keyword.arg] = ast.literal_eval(keyword.value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise CallSyntaxError(f"{name}: the value of {keyword.arg} must be a literal, got {ast.unparse(keyword.value)[:80]!r}") from None
        calls.append((name, args))
    return calls


def parse_calls(response: str) -> list[tuple[str, dict[str, Any]]]:
    """The calls of the response: the whole text if it is a call list, else the last `[...]` that is one.

    No call list at all gives [] (the irrelevance answer); a list that looks like calls but is malformed raises
    CallSyntaxError.
    """
    text = response.rsplit("</think>", 1)[-1].strip()
    text = re.sub(r"^```\w*\s*|\s*```$", "", text)
    try:
        return _to_calls(ast.parse(text, mode="eval").body)
    except (SyntaxError, CallSyntaxError, ValueError, RecursionError, MemoryError):
        pass
    error = None
    for start in [m.start() for m in re.finditer(r"\[", text)][::-1]:
        end = text.find("]", start)
        while end != -1:
            try:
                node = ast.parse(text[start : end + 1], mode="eval").body
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                end = text.find("]", end + 1)
                continue
            if isinstance(node, ast.List) and node.elts and any(isinstance(e, ast.Call) for e in node.elts):
                try:
                    return _to_calls(node)
                except CallSyntaxError as exc:
                    error = error or exc
            break
    if error is not None:
        raise error
    return []


# -- matching --------------------------------------------------------------------------------------------------


def _norm_text(value: str) -> str:
    return _IGNORED_IN_STRINGS.sub("", value).lower()


def value_ok(value: Any, acceptable: list[Any], schema: dict | None) -> bool:
    """Whether `value` equals one acceptable option ("" only marks the argument as optional)."""
    return any(_equal(value, option, schema or {}) for option in acceptable if option != "")


def _equal(value: Any, option: Any, schema: dict) -> bool:
    if isinstance(option, dict) and isinstance(value, dict):
        return _dict_ok(value, option, schema)
    if isinstance(value, bool) or isinstance(option, bool):
        return value is option
    if isinstance(value, (int, float)) and isinstance(option, (int, float)):
        # An int is a valid float ("float" parameters); otherwise the type must match as well as the value.
        return float(value) == float(option) if schema.get("type") == "float" else type(value) is type(option) and value == option
    if isinstance(value, str) and isinstance(option, str):
        return _norm_text(value) == _norm_text(option)
    if isinstance(value, (list, tuple)) and isinstance(option, (list, tuple)):
        items = schema.get("items") or {}
        return len(value) == len(option) and all(_equal(v, o, items) for v, o in zip(value, option))
    return value is None and option is None


def _dict_ok(value: dict, option: dict, schema: dict) -> bool:
    """A nested dict argument: each key's value among its acceptable list; keys with "" acceptable may be left out."""
    if set(value) - set(option):
        return False
    properties = schema.get("properties") or {}
    for key, accepted in option.items():
        accepted = accepted if isinstance(accepted, list) else [accepted]
        if key not in value:
            if "" not in accepted:
                return False
        elif not value_ok(value[key], accepted, properties.get(key)):
            return False
    return True


def call_problems(call: tuple[str, dict], expected: dict[str, dict], docs: dict[str, dict], full: bool) -> list[str]:
    """Why one call does not match one expected call ([] when it does)."""
    name, args = call
    (gold_name, gold_args), = expected.items()
    if name != gold_name:
        return [f"called {name}, expected {gold_name}" if full else f"{name} is not the function this call needs"]
    doc = docs.get(name, {}).get("parameters", {})
    properties = doc.get("properties", {})
    problems = [f"{name}: unexpected argument {a}" for a in args if properties and a not in properties]
    problems += [f"{name}: missing required argument {r}" for r in doc.get("required", []) if r not in args]
    for param, accepted in gold_args.items():
        if param not in args:
            if "" not in accepted and param not in doc.get("required", []):  # required ones are reported above
                problems.append(f"{name}: missing argument {param}")
        elif not value_ok(args[param], accepted, properties.get(param)):
            shown = json.dumps(args[param])[:100]
            options = [a for a in accepted if a != ""]
            problems.append(f"{name}: {param}={shown} is not correct" + (f", expected one of {json.dumps(options)[:150]}" if full else ""))
    return problems


def match_calls(calls: list, expected: list[dict], docs: dict[str, dict], full: bool) -> list[str]:
    """[] iff the calls can be paired one to one with the expected calls; otherwise the closest pairing's problems."""
    if len(calls) != len(expected):
        return [f"made {len(calls)} call(s), expected {len(expected)}"]
    table = [[call_problems(c, e, docs, full) for e in expected] for c in calls]
    best: list[str] | None = None

    def search(i: int, used: frozenset, problems: list[str]) -> bool:
        nonlocal best
        if i == len(calls):
            if best is None or len(problems) < len(best):
                best = problems
            return not problems
        for j in range(len(expected)):
            if j not in used and search(i + 1, used | {j}, problems + table[i][j]):
                return True
        return False

    return [] if search(0, frozenset(), []) else (best or [])


# -- environment -----------------------------------------------------------------------------------------------


@ENVIRONMENTS.register("bfcl")
class BFCLEnv(Environment):
    config_class = BFCLEnvConfig
    scoring_mode = "thread"  # ast parsing of one response: fast, but no hard bound on malicious input

    def load(self, split: str) -> list[Problem]:
        cfg: BFCLEnvConfig = self.config  # type: ignore[assignment]
        wanted = {cfg.train_split: "train", cfg.eval_split: "test"}.get(split, split)
        if wanted not in ("train", "test", "all"):
            raise ValueError(f"bfcl has splits 'train', 'test' and 'all', not {split!r}")
        problems = []
        for category in cfg.categories:
            rows = self._category(category)
            if wanted != "all":
                order = sorted(rows, key=lambda p: p.id)
                random.Random(f"{cfg.seed}:{category}").shuffle(order)
                test_ids = {p.id for p in order[: round(len(order) * cfg.eval_fraction)]}
                rows = [p for p in rows if (p.id in test_ids) == (wanted == "test")]
            problems += rows
        limit = cfg.max_train_rows if wanted == "train" else cfg.max_eval_rows
        return problems[:limit]

    def _category(self, category: str) -> list[Problem]:
        folder = self.config.folder
        question_path = data_file(self.data_dir, f"{folder}/BFCL_v4_{category}.json", f"BFCL {category}")
        answers: dict[str, list] = {}
        if category != "irrelevance":
            answer_path = data_file(self.data_dir, f"{folder}/possible_answer/BFCL_v4_{category}.json", f"BFCL {category} answers")
            for line, row in read_jsonl(answer_path):
                answers[get_field(row, "id", str, answer_path, line)] = get_field(row, "ground_truth", list, answer_path, line)
        problems = []
        for line, row in read_jsonl(question_path):
            problem_id = get_field(row, "id", str, question_path, line)
            functions = get_field(row, "function", list, question_path, line)
            turns = get_field(row, "question", list, question_path, line)
            if len(turns) != 1 or not isinstance(turns[0], list):
                raise DataError(question_path, line, "question", "expected one turn (a list of messages)")
            if category != "irrelevance" and problem_id not in answers:
                raise DataError(question_path, line, "id", f"{problem_id} has no ground truth in possible_answer/")
            system = SYSTEM_PROMPT.format(functions=json.dumps(functions, indent=1))
            extra_system = [m["content"] for m in turns[0] if m.get("role") == "system"]
            messages = [{"role": "system", "content": "\n\n".join([system, *extra_system])}]
            messages += [{"role": m["role"], "content": m["content"]} for m in turns[0] if m.get("role") != "system"]
            docs = {f["name"]: f for f in functions}
            data = {"category": category, "expected": answers.get(problem_id, []), "docs": docs}
            problems.append(Problem(id=problem_id, messages=messages, data=data))
        return problems

    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
        level = self.config.feedback
        try:
            calls = parse_calls(response)
        except CallSyntaxError as exc:
            return Score(0.0, f"The function calls could not be read: {exc}" if level != "none" else "", {"status": "parse_error"})
        expected = problem.data["expected"]
        if not expected:  # irrelevance: the right answer is to call nothing
            if not calls:
                return Score(1.0, "", {"status": "correct"})
            feedback = "None of the functions fits this question: make no call." if level != "none" else ""
            return Score(0.0, feedback, {"status": "unexpected_call"})
        if not calls:
            feedback = "No function call found: answer with a list like [func(param=value)]." if level != "none" else ""
            return Score(0.0, feedback, {"status": "no_call"})
        problems = match_calls(calls, expected, problem.data["docs"], full=level == "full")
        if not problems:
            return Score(1.0, "", {"status": "correct"})
        return Score(0.0, "\n".join(problems[:10]) if level != "none" else "", {"status": "mismatch"})
