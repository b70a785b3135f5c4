"""Code environments on real rows of data, plus extraction, feedback, splits, LiveCodeBench and score.py.

For each code data set, a fast sample: the reference gets 1; a wrong answer, a crash and an infinite loop get 0 with
the matching feedback. The full sets run in benchmarks/code_env_references.py. All programs run in the sandbox.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import pickle
from pathlib import Path
import re
import subprocess
import sys
import zlib

import pytest

from sdpo.envs import ENVIRONMENTS, DataError
from sdpo.envs.code.env import visible_tests
from sdpo.envs.code.extract import extract_program
from sdpo.envs.code.feedback import FeedbackLimits, TestOutcome, format_feedback
from sdpo.envs.code.harness import decode as harness_decode, encode
from sdpo.envs.code.leetcode import LEETCODE_PREAMBLE
from sdpo.envs.code.livecodebench import LiveCodeBenchConfig, LiveCodeBenchEnv
from sdpo.envs.code.values import Unrepresentable, decode as values_decode

REPO = Path(__file__).resolve().parents[1]

# The CodeContests subset ships no reference programs; these are written for this test (and the benchmark).
CODECONTESTS_SOLUTIONS = {
    "1076_b_divisor_subtraction_738": (
        "n = int(input())\nif n % 2 == 0:\n    print(n // 2)\nelse:\n    d, i = n, 3\n    while i * i <= n:\n"
        "        if n % i == 0:\n            d = i\n            break\n        i += 2\n    print(1 + (n - d) // 2)\n"
    ),
    "1068_b_lcm_2510": (
        "b = int(input())\ncount, i = 0, 1\nwhile i * i <= b:\n    if b % i == 0:\n"
        "        count += 1 if i * i == b else 2\n    i += 1\nprint(count)\n"
    ),
    "805_d_minimum_number_of_steps_8284": (
        "import sys\ns = sys.stdin.readline().strip()\nsteps, bs = 0, 0\nfor c in reversed(s):\n    if c == 'b':\n"
        "        bs += 1\n    else:\n        steps = (steps + bs) % (10**9 + 7)\n        bs = bs * 2 % (10**9 + 7)\n"
        "print(steps)\n"
    ),
}

# Appended to a reference to return a wrong value of the same type (so asserts fail as wrong answers).
PERTURB = '''
def _perturb(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1  # far enough for tolerant float checks (math.isclose) as well
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple, set)):  # add an element that is not there yet (a set must change too)
        items = list(value)
        numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
        new = max(numbers) + 1 if len(numbers) == len(items) and items else "x" + max(map(repr, items), key=len, default="")
        return type(value)(items + [new])
    return None
'''


def function_under_test(reference: str, assert_source: str) -> str:
    """The function of `reference` that an MBPP assert calls (asserts may wrap it: set(f(x)), math.isclose(...))."""
    defined = {node.name for node in ast.parse(reference).body if isinstance(node, ast.FunctionDef)}
    calls = [n for n in ast.walk(ast.parse(assert_source.strip())) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    return next(call.func.id for call in calls if call.func.id in defined)


def wrong_variant(reference: str, data: dict) -> str:
    if data["mode"] == "stdin":
        return reference + "\nprint('an extra line')\n"
    target = data.get("func_name") or data.get("candidate") or function_under_test(reference, data["tests"][0]["source"])
    if target.startswith("Solution()."):
        method = target.split(".", 1)[1]
        return reference + PERTURB + (
            f"\n_original = Solution.{method}\n"
            f"Solution.{method} = lambda self, *a, **k: _perturb(_original(self, *a, **k))\n"
        )
    return reference + PERTURB + f"\n_original = {target}\n{target} = lambda *a, **k: _perturb(_original(*a, **k))\n"


def fenced(program: str) -> str:
    return f"Here is my solution.\n\n```python\n{program}\n```\n"


def make_env(name: str, **overrides):
    cls = ENVIRONMENTS.get(name)
    return cls(cls.config_class(**{"time_limit_s": 2.0, "sandbox": "bwrap", **overrides}))


# -- extraction and feedback -----------------------------------------------------------------------------------


def test_extract_program_takes_the_last_complete_python_block():
    text = "```python\nprint(1)\n```\nthen\n```py\nprint(2)\n```\n```bash\nls\n```\n```python\nprint(3)"
    assert extract_program(text) == "print(2)\n"  # the last block is unclosed (cut off)
    assert extract_program("```\nx = 1\n```") == "x = 1\n"  # untagged, when there is no python block
    assert extract_program("<think>```python\ndraft()\n```</think>no code") is None
    assert extract_program("just words") is None
    assert extract_program("```python\n\n```") is None


def test_one_decoder_for_test_arguments_in_the_sandbox_and_return_values_in_the_scorer():
    """harness.decode (stdlib only: it runs inside the sandbox) is also the scorer's values.decode, with `opaque`."""
    value = {"t": (1, 2.5), "s": {3, "x"}, "c": complex(float("inf"), -1.0), "f": [float("-inf")], 7: None}
    sent = json.loads(json.dumps(encode(value)))
    assert harness_decode(sent) == value == values_decode(sent)
    tagged = {"__repr__": "<obj>"}
    assert harness_decode(tagged) == tagged  # the sandbox side leaves what it cannot rebuild as it came
    assert values_decode(tagged) == Unrepresentable("<obj>")
    plain = {"a": {"__tuple__": [1]}}
    assert harness_decode(plain) == plain and values_decode(plain) == {"a": (1,)}  # data's plain JSON objects
    nested = json.loads(json.dumps(encode({frozenset({1})})))  # a set of a frozenset arrives as a set of a set
    with pytest.raises(TypeError):
        harness_decode(nested)
    assert values_decode(nested) == Unrepresentable("{{1}}")


def test_feedback_limits_and_case_choice():
    long_input = "\n".join(f"line {i}" for i in range(20))
    outcomes = [
        TestOutcome(0, "passed", "1", "1", "1"),
        TestOutcome(1, "wrong_answer", long_input, "2", "3"),
        TestOutcome(2, "wrong_answer", "short", "e" * 600, "o"),
        TestOutcome(3, "wrong_answer", "mid input", "5", "6"),
    ]
    text = format_feedback(outcomes)
    assert text.startswith("Test Case 3: Wrong Answer\nInput\nshort\n")  # the two shortest inputs, in test order
    assert "Test Case 4: Wrong Answer" in text and "Test Case 2" not in text
    assert "e" * 247 + "..." in text and "e" * 248 not in text  # 250 characters per field
    fatal = format_feedback(outcomes + [TestOutcome(4, "runtime_error", long_input, "", "", "Traceback\n" + "y" * 400 + "\nValueError: bad")])
    assert fatal.startswith("Runtime Error\n...") and "ValueError: bad\nLast Executed Input\nline 0" in fatal
    assert fatal.count("\nline ") == 8 and fatal.endswith("line 7\n...")  # 8 input lines at most
    assert len(format_feedback(outcomes, FeedbackLimits(total_chars=100))) == 100


def test_no_code_and_truncated_responses_get_zero_and_say_why():
    env = make_env("humaneval")
    problem = env.load("test")[0]
    no_code = env.score(problem, "I would loop over the pairs.")
    assert no_code.reward == 0.0 and no_code.feedback.startswith("No code found") and no_code.info["status"] == "no_code"
    truncated = env.score(problem, fenced(problem.data["reference"]), truncated=True)
    assert truncated.reward == 0.0 and truncated.feedback.startswith("Truncated Attempt")
    syntax = env.score(problem, fenced("def has_close_elements(:"))
    assert syntax.reward == 0.0 and syntax.feedback.startswith("Compile Error\n") and "SyntaxError" in syntax.feedback


# -- splits ----------------------------------------------------------------------------------------------------


def test_train_sees_a_seeded_half_of_each_problems_tests_and_eval_sees_all():
    env = make_env("codecontests")
    train, test = env.load("train"), env.load("test")
    assert len(train) == len(test) == 224  # only reference_passes_exact problems, the same in both splits
    by_id = {p.id: p for p in test}
    for problem in train[:20]:
        full = by_id[problem.id].data["tests"]
        assert len(problem.data["tests"]) == round(len(full) / 2)
        assert all(t in full for t in problem.data["tests"])
    assert [p.data["tests"] for p in make_env("codecontests").load("train")[:5]] == [p.data["tests"] for p in train[:5]]
    other_seed = make_env("codecontests", seed=1).load("train")
    assert [p.data["tests"] for p in other_seed[:10]] != [p.data["tests"] for p in train[:10]]
    assert visible_tests([{"i": 0}], 0.5, 0, "x") == [{"i": 0}]  # never zero tests
    assert len(make_env("codecontests", only_reference_passes=False).load("test")) == 300


def test_heldout_problems_and_official_splits():
    env = make_env("codecontests", heldout_problem_fraction=0.25)
    train, test = {p.id for p in env.load("train")}, {p.id for p in env.load("test")}
    assert not train & test and len(test) == 56 and len(train) == 168
    mbpp = make_env("mbpp")
    assert [len(mbpp.load(s)) for s in ("train", "test", "validation", "prompt")] == [374, 500, 90, 10]
    with pytest.raises(ValueError, match="has splits"):
        mbpp.load("dev")


# -- real rows: references pass, broken variants fail with the matching feedback -------------------------------


@pytest.mark.parametrize("name", ["leetcode", "humaneval", "mbpp", "mbppplus"])
def test_reference_passes_and_broken_variants_fail(name):
    env = make_env(name)
    problems = env.load("test")[:2]
    for problem in problems:
        reference = problem.data["reference"]
        good = env.score(problem, fenced(reference))
        assert good.reward == 1.0 and good.feedback == "", (problem.id, good)
        wrong = env.score(problem, fenced(wrong_variant(reference, problem.data)))
        assert wrong.reward == 0.0 and wrong.info["status"] == "wrong_answer", (problem.id, wrong)
        assert re.match(r"Test Case \d+: Wrong Answer\nInput\n.+\nOutput\n.+\nExpected\n.+", wrong.feedback, re.S)
        crash = env.score(problem, fenced("raise ValueError('broken on purpose')\n" + reference))
        assert crash.reward == 0.0 and crash.feedback.startswith("Runtime Error\nTraceback")
        assert "ValueError: broken on purpose\nLast Executed Input\n" in crash.feedback
    loop = make_env(name, time_limit_s=1.0).score(problems[0], fenced("while True:\n    pass\n" + problems[0].data["reference"]))
    assert loop.reward == 0.0 and loop.feedback.startswith("Time Limit Exceeded\nLast Executed Input\n")


def test_codecontests_solutions_pass_and_broken_variants_fail():
    env = make_env("codecontests")
    problems = {p.id: p for p in env.load("test")}
    for problem_id, program in CODECONTESTS_SOLUTIONS.items():
        problem = problems[problem_id]
        assert env.score(problem, fenced(program)).reward == 1.0, problem_id
    problem = problems["1068_b_lcm_2510"]
    wrong = env.score(problem, fenced(wrong_variant(CODECONTESTS_SOLUTIONS[problem.id], problem.data)))
    assert wrong.reward == 0.0 and wrong.feedback.startswith("Test Case 1: Wrong Answer\nInput\n1\nOutput\n1\nan extra line")
    loop = make_env("codecontests", time_limit_s=1.0).score(problem, fenced("while True: pass"))
    assert loop.feedback == "Time Limit Exceeded\nLast Executed Input\n1"
    fraction = make_env("codecontests", reward="fraction").score(problem, fenced("print(1)"))
    assert fraction.reward == pytest.approx(0.1) and fraction.info["passed"] == 1


def test_malformed_rows_name_file_line_and_field(tmp_path):
    folder = tmp_path / "codecontests_subset"
    folder.mkdir()
    good = {"id": "a", "description": "d", "tests": [{"input": "1", "output": "1"}], "reference_passes_exact": True}
    bad = {**good, "id": "b", "tests": [{"input": 1}]}
    (folder / "problems.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"problems.jsonl:2: field 'tests\[0\]'"):
        make_env("codecontests", data_dir=str(tmp_path)).load("test")
    (folder / "problems.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match=r"problems.jsonl:2: field '<line>': not valid JSON"):
        make_env("codecontests", data_dir=str(tmp_path)).load("test")
    with pytest.raises(FileNotFoundError, match="env.data_dir"):
        make_env("humaneval", data_dir=str(tmp_path)).load("test")


# -- LiveCodeBench's own format --------------------------------------------------------------------------------


def encode_private(tests: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def lcb_row(question_id, date, tests_public, tests_private, func_name=None, starter=""):
    return {
        "question_id": question_id, "question_title": question_id, "question_content": f"Solve {question_id}.",
        "platform": "leetcode" if func_name else "atcoder", "contest_id": "c1", "contest_date": date,
        "starter_code": starter, "difficulty": "easy", "public_test_cases": json.dumps(tests_public),
        "private_test_cases": encode_private(tests_private),
        "metadata": json.dumps({"func_name": func_name} if func_name else {}),
    }


def write_lcb(tmp_path: Path, rows: list[dict]) -> LiveCodeBenchEnv:
    folder = tmp_path / "lcb"
    folder.mkdir(exist_ok=True)
    (folder / "test6.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return LiveCodeBenchEnv(LiveCodeBenchConfig(data_dir=str(tmp_path), path="lcb", time_limit_s=2.0, sandbox="bwrap"))


def test_livecodebench_format(tmp_path):
    stdin = [{"input": f"{a} {b}\n", "output": f"{a + b}\n", "testtype": "stdin"} for a, b in [(1, 2), (5, 7), (10, 20), (0, 0)]]
    functional = [{"input": f"{json.dumps(xs)}\n{k}", "output": json.dumps(sorted(xs)[:k]), "testtype": "functional"}
                  for xs, k in [([3, 1, 2], 2), ([5, 4], 1), ([9, 8, 7, 6], 3), ([1], 1)]]
    rows = [
        lcb_row("abc001_a", "2025-03-01T00:00:00", stdin[:1], stdin[1:]),
        lcb_row("smallest-k", "2025-02-01T12:00:00", functional[:2], functional[2:], "smallestK",
                "class Solution:\n    def smallestK(self, nums: List[int], k: int) -> List[int]:\n        "),
        lcb_row("too-old", "2024-12-31T00:00:00", stdin[:1], stdin[1:]),
        lcb_row("too-new", "2025-05-02T00:00:00", stdin[:1], stdin[1:]),
    ]
    env = write_lcb(tmp_path, rows)
    problems = {p.id: p for p in env.load("test")}
    assert sorted(problems) == ["abc001_a", "smallest-k"]  # the paper's date window, both ends inclusive
    stdin_problem, call_problem = problems["abc001_a"], problems["smallest-k"]
    assert stdin_problem.data["mode"] == "stdin" and len(stdin_problem.data["tests"]) == 4  # public + private
    assert call_problem.data["mode"] == "call" and call_problem.data["func_name"] == "smallestK"
    assert call_problem.data["tests"][2]["args"] == [[9, 8, 7, 6], 3]
    assert "class Solution" in call_problem.messages[-1]["content"]
    assert len(env.load("train")[0].data["tests"]) == 2
    assert env.score(stdin_problem, fenced("a, b = map(int, input().split())\nprint(a + b)")).reward == 1.0
    assert env.score(stdin_problem, fenced("a, b = map(int, input().split())\nprint(f'{a + b:.2f}')")).reward == 1.0
    assert env.score(stdin_problem, fenced("a, b = map(int, input().split())\nprint(a + b + 1)")).reward == 0.0
    solution = "class Solution:\n    def smallestK(self, nums, k):\n        return sorted(nums)[:k]\n"
    assert env.score(call_problem, fenced(solution)).reward == 1.0
    wrong = env.score(call_problem, fenced(solution.replace("[:k]", "[:1]")))
    assert wrong.reward == 0.0
    assert wrong.feedback.startswith("Test Case 1: Wrong Answer\nInput\n[3, 1, 2]\n2\nOutput\n[1]\nExpected\n[1, 2]")
    missing = env.score(call_problem, fenced("class Solution:\n    pass\n"))
    assert missing.feedback.startswith("Runtime Error") and "smallestK" in missing.feedback


def test_livecodebench_malformed_rows(tmp_path):
    stdin = [{"input": "1\n", "output": "1\n", "testtype": "stdin"}]
    functional = [{"input": "[1]", "output": "1", "testtype": "functional"}]
    cases = [
        ({**lcb_row("x", "2025-03-01", stdin, stdin), "private_test_cases": "%%% not base64 %%%"}, "private_test_cases"),
        (lcb_row("x", "2025-03-01", functional, functional), "metadata"),  # functional without func_name
        (lcb_row("x", "March 2025", stdin, stdin), "contest_date"),
        ({**lcb_row("x", "2025-03-01", stdin, stdin), "private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(Path("/")))).decode()}, "private_test_cases"),
    ]
    for row, field in cases:
        env = write_lcb(tmp_path, [lcb_row("ok", "2025-03-01", stdin, stdin), row])
        with pytest.raises(DataError, match=rf"test6.jsonl:2: field '{field}'"):
            env.load("test")


# -- scripts/score.py ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_score_script_prints_one_json_line_per_response(tmp_path):
    responses = tmp_path / "responses.jsonl"
    lines = [
        {"id": "HumanEval/2", "response": fenced("def truncate_number(number):\n    return number % 1.0")},
        {"id": "HumanEval/2", "response": "no code here"},
        {"id": "HumanEval/2", "response": fenced("def truncate_number(number):\n    return 0.0")},
    ]
    responses.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "score.py"), "env=humaneval", f"responses={responses}", "env.score_workers=1"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["reward"] for r in records] == [1.0, 0.0, 0.0]
    assert [r["status"] for r in records] == ["passed", "no_code", "wrong_answer"]
    assert records[2]["feedback"].startswith("Test Case 1: Wrong Answer") and all(r["score_s"] >= 0 for r in records)
    assert "scored 3 responses" in done.stderr


# -- the weaker fallback without bubblewrap (normal programs only: hostile ones run in tests/test_sandbox.py) ----


def test_auto_falls_back_to_the_process_sandbox_when_bwrap_is_missing(monkeypatch, caplog):
    from sdpo.envs.code import sandbox as sandbox_module

    real_which = sandbox_module.shutil.which
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name, **kw: None if name == "bwrap" else real_which(name, **kw))
    with pytest.raises(sandbox_module.SandboxUnavailable, match="apt-get install -y bubblewrap"):
        _ = sandbox_module.Sandbox("bwrap").isolation
    assert sandbox_module.Sandbox("auto").isolation == "process"
    assert "falling back to the weaker process sandbox" in caplog.text


def test_process_sandbox_scores_normal_programs():
    env = make_env("humaneval", sandbox="process")
    problem = env.load("test")[0]
    good = env.score(problem, fenced(problem.data["reference"]))
    assert good.reward == 1.0 and good.info["isolation"] == "process"
    assert env.score(problem, fenced(wrong_variant(problem.data["reference"], problem.data))).info["status"] == "wrong_answer"
    stdin_env = make_env("codecontests", sandbox="process")
    problem = next(p for p in stdin_env.load("test") if p.id == "1068_b_lcm_2510")
    assert stdin_env.score(problem, fenced(CODECONTESTS_SOLUTIONS[problem.id])).reward == 1.0


# -- the judge: no false negatives, nothing slow inside the timer, honest feedback (issue #11) --------------------


def call_problem(func_name: str, tests: list[dict], setup: str = "") -> "Problem":
    from sdpo.envs.base import Problem

    data = {"mode": "call", "tests": tests, "total_tests": len(tests), "func_name": func_name, "setup": setup}
    return Problem(id="call", messages=[], data=data)


def stdin_problem(expected: str, test_input: str = "") -> "Problem":
    from sdpo.envs.base import Problem

    data = {"mode": "stdin", "tests": [{"input": test_input, "output": expected}], "total_tests": 1}
    return Problem(id="stdin", messages=[], data=data)


def test_a_large_return_value_scores_one_inside_a_short_limit():
    # Serialising a returned int used to cost ~30 us inside the per-test timer: 10^5 items took 3.3 s.
    n = 200_000
    problem = call_problem("count", [{"args": [n], "expected_value": list(range(n))}])
    program = "class Solution:\n    def count(self, n):\n        return list(range(n))\n"
    score = make_env("codecontests", time_limit_s=1.0).score_program(problem, program)
    assert score.reward == 1.0, score


@pytest.mark.parametrize("sandbox", ["bwrap", "process"])
def test_leetcode_style_problems_get_sortedcontainers_from_the_judge(tmp_path, sandbox):
    functional = [{"input": "[3, 1, 2]", "output": "[1, 2, 3]", "testtype": "functional"}]
    env = write_lcb(tmp_path, [lcb_row("sorted", "2025-03-01T00:00:00", functional, functional, "sortIt")])
    env.config.sandbox = sandbox
    problem = env.load("test")[0]
    program = "class Solution:\n    def sortIt(self, nums):\n        return list(SortedList(nums))\n"  # no import
    assert env.score(problem, fenced(program)).reward == 1.0
    # The judge's copy next to the program, not whatever the sandbox's interpreter happens to have installed.
    origin = call_problem("where", [{"args": [], "expected_value": True}], LEETCODE_PREAMBLE)
    check = "import sortedcontainers, sys\ndef where():\n    return sortedcontainers.__file__.startswith(sys.path[0])\n"
    assert env.score_program(origin, check).reward == 1.0


def test_one_preamble_covers_every_leetcodedataset_prompt():
    import gzip

    env = make_env("leetcode")
    path = Path(env.data_dir) / env.config.file
    prompts = {json.loads(line)["prompt"] for line in gzip.open(path, "rt")}
    preamble: dict = {}
    exec(LEETCODE_PREAMBLE, preamble)
    for prompt in prompts:
        names: dict = {}
        exec(prompt, names)
        missing = set(names) - set(preamble)
        assert not missing, f"the data set's prompt defines {sorted(missing)}, the preamble does not"
    assert preamble["pow"](3, 4, 5) == 1 and "SortedList" in preamble
    dataset = {}
    exec(max(prompts, key=len), dataset)  # the prompt with every helper: the same trees and lists as the data set's
    for values in ([], [1], [1, None, 2, 3], [5, 3, 8, 1, None, None, 9, None, 2], [1, 2, 3, 4, 5, 6, 7]):
        assert dataset["is_same_tree"](preamble["tree_node"](values), dataset["tree_node"](values))
        assert dataset["is_same_list"](preamble["list_node"](values), dataset["list_node"](values))
    assert not preamble["is_same_tree"](preamble["tree_node"]([1, 2]), preamble["tree_node"]([1, None, 2]))
    assert not preamble["is_same_list"](preamble["list_node"]([1, 2]), preamble["list_node"]([1]))


@pytest.mark.parametrize("sandbox", ["bwrap", "process"])
def test_runtime_errors_keep_type_and_failing_line_and_hide_host_paths(sandbox):
    env = make_env("codecontests", sandbox=sandbox)
    long_message = "def check(x):\n    raise ValueError('bad value ' + 'x' * 10000)\ncheck(1)\n"
    call = call_problem("f", [{"args": [], "expected_value": 1}])
    for problem, program in ((stdin_problem("1"), long_message), (call, long_message.replace("check(1)", "def f():\n    check(1)"))):
        score = env.score_program(problem, program)
        assert score.feedback.startswith("Runtime Error\nTraceback (most recent call last):\n"), score.feedback
        failing_line = "line 2, in check\n    raise ValueError('bad value ' + 'x' * 10000)\n"
        assert failing_line + "ValueError: bad value xxx" in score.feedback
    # An error raised inside the standard library: the program's line is shown, and no path of the host.
    score = env.score_program(stdin_problem("1"), "import fractions\n\nfractions.Fraction('one half')\n")
    outcome_error = score.feedback
    assert 'File "solution.py", line 3, in <module>' in outcome_error and "ValueError: Invalid literal" in outcome_error
    from sdpo.envs.code.execution import ExecutionLimits, run_tests

    tests = [{"input": "", "output": "1"}]
    [outcome] = run_tests(env.sandbox, "import json\n\njson.loads('{')\n", {"mode": "stdin"}, tests, ExecutionLimits())
    assert "json/decoder.py" in outcome.error and 'File "solution.py", line 3' in outcome.error
    for host_path in {sys.base_prefix, sys.prefix, str(Path(env.sandbox.python).parent.parent), "/tmp/"}:
        assert host_path not in outcome.error, (host_path, outcome.error)


def test_a_huge_file_is_told_the_file_size_limit():
    env = make_env("codecontests")
    score = env.score_program(stdin_problem("1"), "open('big.txt', 'w').write('x' * 10**7)\nprint(1)\n")
    assert score.info["status"] == "runtime_error" and "File size limit exceeded" in score.feedback, score
    flood = env.score_program(stdin_problem("1"), "import sys\nwhile True:\n    sys.stdout.write('1' * 65536)\n")
    assert flood.feedback.startswith("Output Limit Exceeded")
    big_file = "def f():\n    open('big.txt', 'w').write('x' * 10**8)\n"
    call = env.score_program(call_problem("f", [{"args": [], "expected_value": 1}]), big_file)
    assert "File too large" in call.feedback and "file size limit of 16777216 bytes" in call.feedback, call


def test_feedback_clips_a_traceback_to_its_failing_line_and_exception():
    from sdpo.envs.code.feedback import clip_error

    frames = "".join(f'  File "solution.py", line {k}, in f{k}\n    f{k + 1}()\n' for k in range(1, 30))
    library = '  File "<stdlib>/json/decoder.py", line 355, in raw_decode\n    raise JSONDecodeError("Expecting value")\n'
    text = "noise first\nTraceback (most recent call last):\n" + frames + library + "json.decoder.JSONDecodeError: " + "v" * 500
    clipped = clip_error(text, 250)
    assert len(clipped) <= 250 and clipped.startswith("Traceback (most recent call last):\n  ...\n")
    assert '  File "solution.py", line 29, in f29\n    f30()\n  ...\njson.decoder.JSONDecodeError: vvv' in clipped
    assert clip_error("short", 250) == "short" and clip_error("z" * 300 + "END", 250).endswith("END")


def test_livecodebench_window_that_loads_nothing_names_the_dates(tmp_path):
    stdin = [{"input": "1\n", "output": "1\n", "testtype": "stdin"}]
    env = write_lcb(tmp_path, [lcb_row("a", "2023-05-07T00:00:00", stdin, stdin), lcb_row("b", "2023-09-30", stdin, stdin)])
    with pytest.raises(ValueError, match=r"dates run from 2023-05-07 to 2023-09-30: set env.contest_date_start"):
        env.load("test")
    env.config.contest_date_start = None
    assert len(env.load("test")) == 2
