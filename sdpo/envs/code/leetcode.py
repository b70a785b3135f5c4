"""LeetCodeDataset v0.2.0 (1890 LeetCode problems, `Solution().method` calls): the LeetCode-style stand-in.

Each assert of the data set's `check(candidate)` is one test; its `input_output` entry (same order, checked at
load time) gives the Input / Expected texts for feedback. `LEETCODE_PREAMBLE` runs before the program: the one
preamble of every LeetCode-style function problem (this data set and LiveCodeBench's LeetCode problems). It covers
what the data set's own `prompt` defines (imports, ListNode / TreeNode and the helpers its asserts call; a test
checks every row's prompt against it) and what LeetCode preloads besides, `sortedcontainers` above all.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from sdpo.envs.base import ENVIRONMENTS, DataError
from sdpo.envs.code.env import CodeEnv, CodeEnvConfig, CodeTask
from sdpo.envs.code.extract import answer_instruction
from sdpo.envs.rows import data_file, get_field, read_jsonl

# What a LeetCode submission may take for granted. `sortedcontainers` reaches the sandbox as a judge library
# (sdpo/envs/code/sandbox.py, JUDGE_PACKAGES).
LEETCODE_PREAMBLE = """\
from typing import *
from collections import *
from functools import *
from itertools import *
from heapq import *
from bisect import *
from string import *
from operator import *
from math import *
from sortedcontainers import SortedDict, SortedKeyList, SortedList, SortedSet
import bisect, collections, copy, datetime, functools, heapq, itertools, math, operator, random, re, string, sys
from builtins import pow  # the star imports of math and operator would hide the three-argument pow

inf = float("inf")


class ListNode:
    def __init__(self, val=0, next=None):
        self.val = val
        self.next = next


class TreeNode:
    def __init__(self, val=0, left=None, right=None):
        self.val = val
        self.left = left
        self.right = right


def list_node(values):
    head = None
    for value in reversed(values or []):
        head = ListNode(value, head)
    return head


def is_same_list(a, b):
    while a is not None and b is not None:
        if a.val != b.val:
            return False
        a, b = a.next, b.next
    return a is None and b is None


def tree_node(values):  # LeetCode's level-order list, None marking a missing child
    if not values:
        return None
    root = TreeNode(values[0])
    parents, k = deque([root]), 1
    while parents and k < len(values):
        node = parents.popleft()
        for side in ("left", "right"):
            if k < len(values) and values[k] is not None:
                child = TreeNode(values[k])
                setattr(node, side, child)
                parents.append(child)
            k += 1
    return root


def is_same_tree(a, b):
    pairs = [(a, b)]
    while pairs:
        a, b = pairs.pop()
        if a is None or b is None:
            if a is not b:
                return False
        elif a.val != b.val:
            return False
        else:
            pairs += [(a.left, b.left), (a.right, b.right)]
    return True
"""
FUNCTION_INSTRUCTION = answer_instruction("solution")


@dataclass
class LeetCodeConfig(CodeEnvConfig):
    _target_: str = "sdpo.envs.code.leetcode.LeetCodeEnv"
    name: str = "leetcode"
    file: str = "leetcodedataset/LeetCodeDataset-v0.2.0-train.jsonl.gz"


def check_asserts(test_source: str, path, line: int, field: str = "test") -> list[str]:
    """The assert statements of `def check(candidate)`, each as source text."""
    try:
        module = ast.parse(test_source)
    except SyntaxError as exc:
        raise DataError(path, line, field, f"not valid Python ({exc.msg})") from None
    check = next((n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:
        raise DataError(path, line, field, "has no `def check(candidate)`")
    asserts = [ast.get_source_segment(test_source, s) for s in check.body if isinstance(s, ast.Assert)]
    if not asserts:
        raise DataError(path, line, field, "check() has no assert")
    return asserts


@ENVIRONMENTS.register("leetcode")
class LeetCodeEnv(CodeEnv):
    config_class = LeetCodeConfig

    def read_tasks(self) -> list[CodeTask]:
        cfg: LeetCodeConfig = self.config  # type: ignore[assignment]
        path, rows = self.read_rows(cfg.file, "LeetCodeDataset")
        tasks = []
        for line, row in rows:
            asserts = check_asserts(get_field(row, "test", str, path, line), path, line)
            cases = get_field(row, "input_output", list, path, line)
            if len(cases) != len(asserts):
                raise DataError(path, line, "input_output", f"{len(cases)} cases for {len(asserts)} asserts in test")
            tests = []
            for k, (source, case) in enumerate(zip(asserts, cases)):
                if not (isinstance(case, dict) and isinstance(case.get("input"), str) and "output" in case):
                    raise DataError(path, line, f"input_output[{k}]", "expected {input: str, output: ...}")
                tests.append({"source": source, "input": case["input"], "expected": str(case["output"])})
            tasks.append(
                CodeTask(
                    id=get_field(row, "task_id", str, path, line),
                    prompt=f"{get_field(row, 'query', str, path, line).strip()}\n\n{FUNCTION_INSTRUCTION}",
                    mode="assert",
                    tests=tests,
                    reference=get_field(row, "completion", str, path, line),
                    setup=LEETCODE_PREAMBLE,
                    candidate=get_field(row, "entry_point", str, path, line),
                    meta={"difficulty": (row.get("meta") or {}).get("difficulty")},
                )
            )
        return tasks
