"""Tool use on SDPO's ToolAlpaca test split (the paper's reward, feedback off by default) and BFCL (AST matching)."""

from __future__ import annotations

import json

import pytest

from sdpo.envs import DataError
from sdpo.envs.bfcl import BFCLEnv, BFCLEnvConfig, parse_calls
from sdpo.envs.tooluse import ToolUseEnv, ToolUseEnvConfig, parse_actions


def react(actions: list[str], inputs: list[dict]) -> str:
    return "\n".join(f"Thought: I need {a}.\nAction: {a}\nAction Input: {json.dumps(i)}\nObservation: ..." for a, i in zip(actions, inputs))


def test_tooluse_exact_test_split_and_prompt():
    env = ToolUseEnv(ToolUseEnvConfig())
    problems = env.load("test")
    assert len(problems) == 68 and problems[0].id == "4046"
    assert problems[0].messages[-1]["content"].startswith("Your task is to answer the user's question using available tools.")
    assert len(env.load("eval_real")) == 110 and len(env.load("eval_simulated")) == 68
    with pytest.raises(FileNotFoundError, match="train split"):
        env.load("train")


def test_tooluse_paper_reward():
    env = ToolUseEnv(ToolUseEnvConfig())
    problems = env.load("test")
    multi = next(p for p in problems if len(p.data["actions"]) > 1 and p.data["inputs"])
    names, inputs = multi.data["actions"], multi.data["inputs"]
    split_inputs = [dict(list(inputs.items())[: len(inputs) // 2]), dict(list(inputs.items())[len(inputs) // 2 :])]
    split_inputs += [{}] * (len(names) - 2)
    assert env.score(multi, react(names, split_inputs)).reward == 1.0  # inputs are merged across actions
    assert env.score(multi, react(list(reversed(names)), split_inputs)).reward == 1.0  # a multiset of names
    assert env.score(multi, react(names[:1], [inputs])).reward == 0.0  # a missing action
    changed = {**inputs, next(iter(inputs)): "something else"}
    wrong = env.score(multi, react(names, [changed] + [{}] * (len(names) - 1)))
    assert wrong.reward == 0.0 and wrong.feedback == "" and wrong.info["status"] == "wrong_input"  # off by default


def test_tooluse_feedback_levels():
    problem = ToolUseEnv(ToolUseEnvConfig()).load("test")[0]
    none = ToolUseEnv(ToolUseEnvConfig()).score(problem, "I cannot help.")
    assert (none.reward, none.feedback, none.info["status"]) == (0.0, "", "no_action")
    fmt = ToolUseEnv(ToolUseEnvConfig(feedback="format"))
    assert "No action found" in fmt.score(problem, "I cannot help.").feedback
    with_inputs = next(p for p in ToolUseEnv(ToolUseEnvConfig()).load("test") if p.data["inputs"])
    bad_json = fmt.score(with_inputs, f"Action: {with_inputs.data['actions'][0]}\nAction Input: {{oops}}")
    assert "not valid JSON" in bad_json.feedback and "expected" not in bad_json.feedback  # reveals nothing
    full = ToolUseEnv(ToolUseEnvConfig(feedback="full")).score(problem, "Action: wrongTool\nAction Input: {}")
    assert full.feedback == "Actions mismatch: predicted ['wrongTool'], expected ['getRandomAxolotlImage']"
    assert parse_actions("Action: a\nAction Input: {\"x\": 1}\nAction: b\nAction Input: {\"y\": [1, 2]}") == (
        ["a", "b"], {"x": 1, "y": [1, 2]}, [])


def test_tooluse_malformed_answer(tmp_path):
    folder = tmp_path / "tooluse_sdpo"
    folder.mkdir()
    (folder / "test.jsonl").write_text(json.dumps({"idx": 1, "prompt": "p", "answer": "[{\"Act\": 1}]"}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:1: field 'answer'"):
        ToolUseEnv(ToolUseEnvConfig(data_dir=str(tmp_path))).load("test")


def bfcl_problem(problem_id: str):
    env = BFCLEnv(BFCLEnvConfig(feedback="full"))
    category = problem_id.rsplit("_", 1)[0]
    return env, next(p for p in env._category(category) if p.id == problem_id)


def test_bfcl_simple_call():
    env, problem = bfcl_problem("simple_python_0")  # calculate_triangle_area(base=10, height=5[, unit])
    assert "calculate_triangle_area" in problem.messages[0]["content"]
    assert env.score(problem, "[calculate_triangle_area(base=10, height=5)]").reward == 1.0
    assert env.score(problem, "Sure:\n```python\n[calculate_triangle_area(base=10, height=5, unit='units')]\n```").reward == 1.0
    wrong = env.score(problem, "[calculate_triangle_area(base=10, height=6)]")
    assert wrong.reward == 0.0 and "height=6 is not correct, expected one of [5]" in wrong.feedback
    assert "missing required argument height" in env.score(problem, "[calculate_triangle_area(base=10)]").feedback
    assert "unexpected argument colour" in env.score(problem, "[calculate_triangle_area(base=10, height=5, colour=1)]").feedback
    assert env.score(problem, "[calculate_triangle_area(10, 5)]").info["status"] == "parse_error"
    assert env.score(problem, "The area is 25.").info["status"] == "no_call"


def test_bfcl_parallel_is_order_free_and_irrelevance_wants_no_call():
    env, problem = bfcl_problem("parallel_multiple_0")
    calls = ["math_toolkit.sum_of_multiples(lower_limit=1, upper_limit=1000, multiples=[3, 5])",
             "math_toolkit.product_of_primes(count=5)"]
    assert env.score(problem, f"[{calls[0]}, {calls[1]}]").reward == 1.0
    assert env.score(problem, f"[{calls[1]}, {calls[0]}]").reward == 1.0
    assert "made 1 call(s), expected 2" in env.score(problem, f"[{calls[0]}]").feedback
    _, irrelevant = bfcl_problem("irrelevance_0")
    assert env.score(irrelevant, "None of these functions computes a triangle's area.").reward == 1.0
    assert env.score(irrelevant, "[determine_body_mass_index(weight=10, height=5)]").reward == 0.0
    assert parse_calls("text [a.b(x=1.5, y=[1, 2], z={'k': None})] more") == [("a.b", {"x": 1.5, "y": [1, 2], "z": {"k": None}})]


def test_bfcl_splits():
    env = BFCLEnv(BFCLEnvConfig(categories=["simple_python", "irrelevance"]))
    train, test, everything = env.load("train"), env.load("test"), env.load("all")
    assert len(everything) == 640 and len(train) + len(test) == 640 and not {p.id for p in train} & {p.id for p in test}
