"""Teacher context from the data (issue #30): a reference or hint that only the self-teacher sees.

It comes from a dataset column (TRL's `privileged_context`), a reward function's Score.info["teacher_context"] or an
environment's reference (env.reference_as_teacher_context); algorithm.reprompt.data_context orders it against a
successful sibling. It must never reach the student's prompt or a rollout's prompt."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY_OVERRIDES
from datasets import Dataset
import pytest

from sdpo import SDPOTrainer, Score, load_config
from sdpo.config import ConfigError, RepromptConfig
from sdpo.envs import DataError
from sdpo.envs.base import Problem
from sdpo.envs.dataset import DatasetEnv, DatasetEnvConfig, read_split
from sdpo.teacher.reprompt import build_reprompts, solution_slot

MARKER = "ZEBRA QUOKKA reference"
WORDS = ["apple", "river", "stone", "cloud"]


def never(prompts, completions, **kwargs):
    """Every attempt fails and no feedback is given: only the data's context can give the teacher a signal."""
    return [0.0 for _ in completions]


def overrides(tmp_path, *extra):
    return [*TINY_OVERRIDES, "model=tiny", f"trainer.output_dir={tmp_path / 'run'}", "trainer.questions_per_step=4",
            "trainer.mini_batch_questions=4", "algorithm=sdpo", *extra]


def contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


# ---------------------------------------------------------------------------------------------------------------
# the reprompt: which context fills the solution slot (pure)


@pytest.mark.parametrize("mode, sibling, expected, from_data", [
    ("fallback", "SIB", "SIB", False), ("fallback", None, "CTX", True),
    ("prefer", "SIB", "CTX", True), ("prefer", None, "CTX", True),
    ("both", "SIB", "SIB\n\nCTX", True), ("both", None, "CTX", True),
    ("off", "SIB", "SIB", False), ("off", None, None, False),
])
def test_the_solution_slot_follows_data_context(mode, sibling, expected, from_data):
    config = RepromptConfig(data_context=mode)
    assert solution_slot(sibling, "CTX", config) == (expected, from_data)
    assert solution_slot(sibling, None, config) == (sibling, False)  # rows without context: as before
    assert solution_slot(sibling, "   ", config) == (sibling, False)


def test_the_context_template_and_its_check():
    config = RepromptConfig(data_context_template="A hint: {context}")
    assert solution_slot(None, "add the units", config) == ("A hint: add the units", True)
    with pytest.raises(ConfigError, match="data_context_template"):
        RepromptConfig(data_context_template="no placeholder")


def test_build_reprompts_reads_the_problems_context_and_a_per_row_override():
    import random

    problems = [Problem("q", [{"role": "user", "content": "What is 2+2?"}], teacher_context="4")] * 2
    reprompts = build_reprompts(problems, ["5", "3"], [0.0, 0.0], ["", ""], [0, 0], RepromptConfig(), random.Random(0))
    assert [(r.solution, r.from_data, r.has_signal) for r in reprompts] == [("4", True, True)] * 2
    rows = build_reprompts(problems, ["5", "3"], [0.0, 0.0], ["", ""], [0, 0], RepromptConfig(), random.Random(0),
                           contexts=["four", None])
    assert [r.solution for r in rows] == ["four", None]


# ---------------------------------------------------------------------------------------------------------------
# the data: datasets rows, JSON Lines, TRL-style chat datasets, reward functions, an environment's reference


ROWS = [{"prompt": f"Say the word {w}.", "answer": w, "privileged_context": f"{MARKER} {w}"} for w in WORDS]


def test_the_column_is_read_from_datasets_rows_json_lines_and_chat_datasets(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    chat_rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "privileged_context": r["privileged_context"]}
                 for r in ROWS]
    for dataset in (Dataset.from_list(ROWS), Dataset.from_list(chat_rows), None):
        config = DatasetEnvConfig(path=None if dataset is not None else str(path))
        problems = DatasetEnv(config, train_dataset=dataset, reward_funcs=[never]).load("train")
        assert [p.teacher_context for p in problems] == [f"{MARKER} {w}" for w in WORDS]
        assert all(MARKER not in json.dumps(p.messages) for p in problems)  # not in the student's chat


def test_rows_without_the_column_have_no_context_and_a_bad_value_names_file_line_and_field(tmp_path):
    plain = DatasetEnv(DatasetEnvConfig(), train_dataset=Dataset.from_list([{"prompt": "hi"}]), reward_funcs=[never])
    assert plain.load("train")[0].teacher_context is None
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "privileged_context": "ok"}) + "\n"
                    + json.dumps({"prompt": "ho", "privileged_context": 7}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'privileged_context': expected text"):
        DatasetEnv(DatasetEnvConfig(path=str(path)), reward_funcs=[never]).load("train")


def test_a_broken_json_lines_row_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "cut off", "answer": \n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        read_split(path, "train")
    array = tmp_path / "broken.json"
    array.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]')
    with pytest.raises(DataError, match=r"broken.json:3: not valid JSON"):
        read_split(array, "train")


@pytest.mark.slow
def test_teacher_only_context_never_reaches_the_student_or_the_rollouts(tmp_path):
    trainer = SDPOTrainer(train_dataset=Dataset.from_list(ROWS), reward_funcs=[never], overrides=overrides(tmp_path))
    sent: list[list[int]] = []
    generate = trainer.engine.generate
    trainer.engine.generate = lambda prompts, sampling: sent.extend(map(list, prompts)) or generate(prompts, sampling)
    result = trainer.training_step()
    batch, tokenizer = result.batch, trainer.tokenizer
    marker_ids = tokenizer.encode(MARKER, add_special_tokens=False)
    assert sent and not any(contains(p, marker_ids) for p in sent)  # the engine never saw it
    assert not any(contains(p, marker_ids) for p in batch.prompt_ids)  # nor the student's forward
    # Every rollout failed with no feedback: the data's context is each reprompt's only signal, its own row's.
    teacher_texts = [tokenizer.decode(ids) for ids in batch.teacher_prompt_ids]
    for text, problem_id in zip(teacher_texts, batch.problem_ids, strict=True):
        word = WORDS[int(problem_id.split("/")[1])]
        assert f"{MARKER} {word}" in text
    assert result.metrics["teacher/data_context_fraction"] == 1.0 and batch.distill_mask_B.all()
    assert result.metrics["distill/student_teacher_kl"] != 0.0  # the teacher differs from the student there


@pytest.mark.slow
def test_data_context_off_leaves_the_teacher_without_a_signal(tmp_path):
    trainer = SDPOTrainer(train_dataset=Dataset.from_list(ROWS), reward_funcs=[never],
                          overrides=overrides(tmp_path, "algorithm.reprompt.data_context=off"))
    result = trainer.training_step()
    assert result.metrics["teacher/data_context_fraction"] == 0.0 and not result.batch.distill_mask_B.any()


def test_a_reward_function_may_return_the_context(tmp_path):
    def hinting(prompts, completions, answer, **kwargs):
        return [Score(0.0, "", {"teacher_context": f"HINT-FROM-JUDGE {a}"}) for a in answer]

    rows = [{k: v for k, v in r.items() if k != "privileged_context"} for r in ROWS]
    trainer = SDPOTrainer(train_dataset=Dataset.from_list(rows), reward_funcs=[hinting], overrides=overrides(tmp_path))
    batch = trainer.training_step().batch
    texts = [trainer.tokenizer.decode(ids) for ids in batch.teacher_prompt_ids]
    assert all("HINT-FROM-JUDGE" in t for t in texts)
    assert not any(contains(p, trainer.tokenizer.encode("HINT-FROM-JUDGE", add_special_tokens=False))
                   for p in batch.prompt_ids)


@pytest.mark.slow
def test_an_environments_reference_as_teacher_context(tmp_path):
    config = load_config([*overrides(tmp_path), "env=arithmetic", "env.reference_as_teacher_context=true"])
    trainer = SDPOTrainer(config)
    assert all(p.teacher_context == str(p.data["answer"]) for p in trainer.train_problems)
    with pytest.raises(ConfigError, match="no reference_response"):
        SDPOTrainer(train_dataset=Dataset.from_list(ROWS), reward_funcs=[never],
                    overrides=overrides(Path(tmp_path) / "b", "env.reference_as_teacher_context=true"))


@pytest.mark.parametrize("name", ["arithmetic", "convention", "gsm8k", "math500", "mbpp", "humaneval"])
def test_each_builtin_reference_is_correct_under_its_own_checker(name):
    from sdpo.envs import ENVIRONMENTS, build_environment

    env = build_environment(ENVIRONMENTS.get(name).config_class())
    problems = env.load(env.config.train_split)[:2]
    references = [env.reference_response(p) for p in problems]
    scores = env.score_batch(problems, references, [False] * len(problems))
    assert [s.reward for s in scores] == [1.0] * len(problems), [s.feedback for s in scores]
