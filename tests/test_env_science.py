"""Science QA on SDPO's SciKnowEval files: exact splits, the row's own prompt, the paper's answer-tag reward."""

from __future__ import annotations

import json

import pytest

from sdpo.envs import DataError
from sdpo.envs.science import ScienceEnv, ScienceEnvConfig, last_answer

PAPER_SPLITS = {"biology": (450, 50), "chemistry": (1890, 210), "material": (841, 94), "physics": (720, 80)}


@pytest.mark.parametrize("domain", sorted(PAPER_SPLITS))
def test_exact_paper_splits(domain):
    env = ScienceEnv(ScienceEnvConfig(domains=[domain]))
    assert (len(env.load("train")), len(env.load("test"))) == PAPER_SPLITS[domain]


def test_prompt_is_the_rows_own_system_and_user_message():
    env = ScienceEnv(ScienceEnvConfig(domains=["chemistry"]))
    problem = env.load("test")[0]
    row = json.loads((env.data_dir / "sciknoweval_sdpo/chemistry/test.jsonl").read_text().splitlines()[0])
    assert problem.messages == [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["prompt"]}]
    assert "<answer>" in row["system"] and row["prompt"].endswith("Please reason step by step.")
    assert problem.id == f"chemistry/{row['idx']}" and problem.data["answer"] == row["answer"]


def test_reward_is_the_letter_in_the_last_answer_tag():
    env = ScienceEnv(ScienceEnvConfig(domains=["physics"]))
    problem = env.load("test")[3]
    gold = problem.data["answer"]
    wrong = next(letter for letter in "ABCD" if letter != gold)
    right = env.score(problem, f"<reasoning>First <answer>{wrong}</answer> no.</reasoning>\n<answer>\n{gold}\n</answer>")
    assert (right.reward, right.feedback) == (1.0, "")
    assert env.score(problem, f"<reasoning>...</reasoning><answer>{wrong}</answer>").reward == 0.0
    assert env.score(problem, f"The answer is {gold}.").reward == 0.0  # no tag, no answer
    # The paper's setting: no feedback text at all.
    assert env.score(problem, "no tag").feedback == "" and env.score(problem, f"<answer>{wrong}</answer>").feedback == ""
    assert last_answer("<answer> B ") == "B" and last_answer("none") is None


def test_feedback_levels_say_what_was_missing():
    problem = ScienceEnv(ScienceEnvConfig(domains=["biology"])).load("test")[0]
    fmt = ScienceEnv(ScienceEnvConfig(domains=["biology"], feedback="format"))
    missing = fmt.score(problem, "I think it is B")
    assert missing.reward == 0.0 and missing.info["status"] == "no_answer" and "<answer>" in missing.feedback
    wrong = next(letter for letter in "ABCD" if letter != problem.data["answer"])
    assert fmt.score(problem, f"<answer>{wrong}</answer>").feedback == ""
    full = ScienceEnv(ScienceEnvConfig(domains=["biology"], feedback="full"))
    assert "not correct" in full.score(problem, f"<answer>{wrong}</answer>").feedback


def test_malformed_row(tmp_path):
    folder = tmp_path / "sciknoweval_sdpo" / "biology"
    folder.mkdir(parents=True)
    row = {"idx": 1, "answer": "E", "prompt": "q", "system": "s"}
    (folder / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:1: field 'answer'"):
        ScienceEnv(ScienceEnvConfig(domains=["biology"], data_dir=str(tmp_path))).load("test")
