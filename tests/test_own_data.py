"""Bring your own model, data and reward (issue #13): every accepted form of model, dataset and reward function;
feedback reaching the teacher; raising and hanging reward functions; missing columns; the example notebook."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
import threading

from conftest import TINY_OVERRIDES
from datasets import Dataset, DatasetDict
import pytest
import torch

from sdpo import SDPOTrainer, Score, load_config
from sdpo.config import ConfigError
from sdpo.envs import DataError, build_environment
from sdpo.envs.base import Problem
from sdpo.envs.dataset import DatasetEnv, DatasetEnvConfig
from sdpo.inputs import resolve_inputs

REPO = Path(__file__).resolve().parents[1]
WORDS = ["apple", "river", "stone", "cloud", "light", "green"]
ROWS = [{"prompt": f"Say the word {w}.", "word": w, "answer": w} for w in WORDS]


def contains_word(prompts, completions, word, **kwargs):
    return [(1.0, "") if w in c else (0.0, f"Say {w!r}.") for c, w in zip(completions, word)]


def env_over(dataset=None, reward_funcs=(contains_word,), **fields) -> DatasetEnv:
    return DatasetEnv(DatasetEnvConfig(**fields), train_dataset=dataset, reward_funcs=list(reward_funcs) or None)


def score_one(env: DatasetEnv, response: str, row: int = 0) -> Score:
    problem = env.load("train")[row]
    return env.score_batch([problem], [response], [False])[0]


def overrides(tmp_path, *extra):
    return [*TINY_OVERRIDES, f"trainer.output_dir={tmp_path / 'run'}", *extra]


# ---------------------------------------------------------------------------------------------------------------
# datasets: objects, files, saved folders, the command line


def write_rows(path: Path, rows: list[dict]) -> Path:
    Dataset.from_list(rows).to_json(path) if path.suffix == ".jsonl" else None
    if path.suffix == ".parquet":
        Dataset.from_list(rows).to_parquet(path)
    if path.suffix == ".csv":
        Dataset.from_list(rows).to_csv(path, index=False)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_files_load_through_datasets(tmp_path, suffix):
    path = write_rows(tmp_path / f"data{suffix}", ROWS)
    problems = env_over(path=str(path)).load("train")
    assert [p.question for p in problems] == [r["prompt"] for r in ROWS]
    assert problems[2].data["columns"] == {"word": "stone", "answer": "stone"}
    assert problems[2].id == "train/2"


def test_saved_dataset_dict_gives_both_splits_and_split_slicing_holds_out_rows(tmp_path):
    DatasetDict({"train": Dataset.from_list(ROWS[:4]), "test": Dataset.from_list(ROWS[4:])}).save_to_disk(tmp_path / "saved")
    env = env_over(path=str(tmp_path / "saved"))
    assert [p.data["columns"]["word"] for p in env.load("test")] == WORDS[4:]
    assert len(env.load("train")) == 4
    sliced = env_over(path=str(write_rows(tmp_path / "d.jsonl", ROWS)), train_split="train[:4]", eval_split="train[4:]")
    assert [p.data["columns"]["word"] for p in sliced.load("train[4:]")] == WORDS[4:]
    assert env_over(path=str(tmp_path / "d.jsonl")).load("test") == []  # one file: no held-out split


def test_in_memory_forms_and_chat_prompts():
    chat = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["prompt"]}],
             "word": r["word"]} for r in ROWS]
    for given in (Dataset.from_list(chat), chat, DatasetDict({"train": Dataset.from_list(chat)})):
        env = env_over(given)
        assert env.load("train")[0].messages == chat[0]["prompt"]
        assert env.load("test") == []  # training data only: no held-out split
    # A chat prompt gets a chat completion (TRL's convention), text gets text.
    seen = []
    env = env_over(Dataset.from_list(chat), reward_funcs=[lambda prompts, completions, **kw: seen.append(completions) or [1.0]])
    score_one(env, "apple")
    assert seen == [[[{"role": "assistant", "content": "apple"}]]]


def test_command_line_dataset_env_with_a_builtin_and_a_module_reward(tmp_path):
    path = write_rows(tmp_path / "data.jsonl", ROWS)
    config = load_config(["env=dataset", f"env.path={path}", "env.rewards=[exact_match,own_rewards:contains_word]",
                          "env.reward_weights=[2.0,1.0]", "env.system_prompt=Be brief."])
    env = build_environment(config.env)
    assert env.scoring_mode == "process"  # importable functions: killable worker processes
    problems = env.load("train")
    assert problems[0].messages[0] == {"role": "system", "content": "Be brief."}
    scores = env.score_batch(problems[:2], ["apple", "not it"], [False, False])
    assert scores[0].reward == 3.0 and scores[0].feedback == ""
    assert scores[1].reward == 0.0
    assert "exact answer only" in scores[1].feedback and "'river'" in scores[1].feedback


def test_builtin_math_verify_checks_equivalence_and_says_when_no_answer_is_found():
    rows = [{"prompt": "What is 1/2 + 1/4?", "solution": "\\frac{3}{4}"}]
    env = DatasetEnv(DatasetEnvConfig(rewards=["math_verify"], answer_column="solution"), train_dataset=rows)
    problem = env.load("train")[0]
    assert env.score(problem, "So it is $\\boxed{0.75}$.").reward == 1.0
    assert env.score(problem, "$\\boxed{\\frac{2}{3}}$").reward == 0.0
    assert "No final answer found" in env.score(problem, "I do not know.").feedback


def test_unknown_reward_name_lists_the_builtins():
    with pytest.raises(ConfigError, match="exact_match.*math_verify|math_verify.*exact_match"):
        env_over(path="x.jsonl", reward_funcs=(), rewards=["exact_matsh"])
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        env_over(path="x.jsonl", reward_funcs=(), rewards=["no_such_module:f"])
    with pytest.raises(ConfigError, match="no reward function"):
        env_over(Dataset.from_list(ROWS), reward_funcs=()).load("train")


# ---------------------------------------------------------------------------------------------------------------
# bad data fails at load time, saying what to fix


def test_missing_columns_are_named_with_the_columns_the_dataset_has(tmp_path):
    with pytest.raises(ValueError, match=r"no column 'question' \(named by env.prompt_column\).*columns are: prompt, word, answer"):
        env_over(Dataset.from_list(ROWS), prompt_column="question").load("train")

    def needs_solution(prompts, completions, solution, **kwargs):
        return [1.0]

    path = write_rows(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(ValueError, match=rf"{path}: no column 'solution' \(named by reward function needs_solution\)"):
        env_over(path=str(path), reward_funcs=[needs_solution]).load("train")


def test_malformed_prompt_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "fine", "word": "a"}, {"prompt": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}], "word": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: field 'prompt\[1\]'"):
        env_over(path=str(path)).load("train")


# ---------------------------------------------------------------------------------------------------------------
# reward functions: return forms, weights, exceptions, timeouts


def test_each_return_form_and_weights_combine():
    def floats(prompts, completions, **kw):
        return [0.5]

    def tuples(prompts, completions, **kw):
        return [(1.0, "tuple feedback")]

    def scores(prompts, completions, **kw):
        return [Score(2.0, "score feedback", {"status": "checked"})]

    def not_applicable(prompts, completions, **kw):
        return [None]

    env = env_over(Dataset.from_list(ROWS), reward_funcs=[floats, tuples, scores, not_applicable],
                   reward_weights=[2.0, 1.0, 0.5, 3.0])
    score = score_one(env, "anything")
    assert score.reward == pytest.approx(2 * 0.5 + 1.0 + 0.5 * 2.0)
    assert score.feedback == "tuple feedback\n\nscore feedback"
    assert score.info["status"] == "checked" and score.info["reward/floats"] == 0.5


def test_columns_reach_functions_by_name_or_kwargs():
    calls = {}

    def by_name(prompts, completions, word):  # no **kwargs: only the columns it names
        calls["by_name"] = word
        return [1.0]

    def by_kwargs(prompts, completions, **kwargs):
        calls["by_kwargs"] = kwargs
        return [1.0]

    score_one(env_over(Dataset.from_list(ROWS), reward_funcs=[by_name, by_kwargs]), "x", row=1)
    assert calls == {"by_name": ["river"], "by_kwargs": {"word": ["river"], "answer": ["river"]}}


def test_a_raising_function_gives_reward_0_and_its_exception_as_feedback(caplog):
    def flaky(prompts, completions, **kw):
        if "boom" in completions[0]:
            raise ZeroDivisionError("the judge divided by zero")
        return [1.0]

    env = env_over(Dataset.from_list(ROWS), reward_funcs=[flaky])
    problems = env.load("train")[:2]
    with caplog.at_level(logging.WARNING):
        scores = env.score_batch(problems, ["boom", "fine"], [False, False])
    assert scores[0].reward == 0.0 and "ZeroDivisionError: the judge divided by zero" in scores[0].feedback
    assert scores[1].reward == 1.0
    assert "the judge divided by zero" in caplog.text


def test_a_wrong_return_type_is_reported_like_an_exception():
    # Raised on every completion of the batch: the function is broken, and the run stops saying so.
    from sdpo.envs.pool import ScoringError

    env = env_over(Dataset.from_list(ROWS), reward_funcs=[lambda prompts, completions, **kw: "1.0"])
    with pytest.raises(ScoringError, match=r"^reward function\(s\) <lambda> raised on all 1 completions of the batch, "
                                           r"the first with TypeError: reward function <lambda> returned '1.0': "
                                           "expected a list with one entry per completion"):
        score_one(env, "x")


def test_unpicklable_functions_run_in_threads_with_the_trade_off_logged_and_a_hang_times_out(caplog):
    release = threading.Event()

    def stuck(prompts, completions, **kw):  # a closure: cannot be pickled
        if completions == ["hang"]:
            release.wait(30)
        return [1.0]

    with caplog.at_level(logging.WARNING):
        env = env_over(Dataset.from_list(ROWS), reward_funcs=[stuck], score_timeout_s=0.5)
    assert env.scoring_mode == "thread"
    assert "cannot be stopped" in caplog.text and "stuck is defined" not in caplog.text
    problems = env.load("train")[:2]
    try:
        scores = env.score_batch(problems, ["hang", "fine"], [False, False])
    finally:
        release.set()
    assert scores[0].reward == 0.0 and "timed out after 0.5 s" in scores[0].feedback
    assert scores[1].reward == 1.0


def test_a_hanging_function_in_a_worker_process_is_killed():
    from own_rewards import hang_on_hang

    env = env_over(Dataset.from_list(ROWS), reward_funcs=[hang_on_hang], score_timeout_s=1.0, score_workers=1)
    assert env.scoring_mode == "process"
    problems = env.load("train")[:2]
    scores = env.score_batch(problems, ["hang", "fine"], [False, False])
    assert scores[0].reward == 0.0 and "timed out" in scores[0].feedback
    assert scores[1].reward == 1.0  # a fresh worker took over


# ---------------------------------------------------------------------------------------------------------------
# the trainer: models, datasets, rewards, feedback in the teacher's reprompt


def test_feedback_and_exceptions_reach_the_teachers_reprompt(tmp_path):
    def judge(prompts, completions, word, **kw):
        if len(completions[0]) % 3 == 0:
            raise RuntimeError("JUDGE-CRASHED")
        return [(0.0, f"FEEDBACK-MARKER for {word[0]}")]

    trainer = SDPOTrainer(train_dataset=Dataset.from_list(ROWS), reward_funcs=judge,
                          overrides=overrides(tmp_path, "model=tiny", "trainer.questions_per_step=4",
                                              "trainer.mini_batch_questions=4"))
    result = trainer.training_step()  # training goes on past the crashed samples
    metrics, batch = result.metrics, result.batch
    teacher_texts = [trainer.tokenizer.decode(ids) for ids in batch.teacher_prompt_ids]
    for text, feedback in zip(teacher_texts, batch.feedback, strict=True):
        assert feedback.split(" for ")[0] in text  # each rollout's own feedback is in its reprompt
    assert any("FEEDBACK-MARKER" in t for t in teacher_texts)
    assert metrics["teacher/feedback_fraction"] == 1.0
    assert any("JUDGE-CRASHED" in f for f in batch.feedback) == any(len(t) % 3 == 0 for t in batch.response_text)


def test_a_config_from_the_command_line_trains_and_evaluates_on_a_held_out_slice(tmp_path):
    path = write_rows(tmp_path / "data.jsonl", ROWS)
    config = load_config(["env=dataset", f"env.path={path}", "env.train_split='train[:4]'", "env.eval_split='train[4:]'",
                          "env.rewards=[own_rewards:contains_word]", *overrides(tmp_path, "eval.every=1",
                                                                                  "eval.samples_per_question=2")])
    trainer = SDPOTrainer(config)
    assert [p.id for p in trainer.eval_problems] == ["train[4:]/0", "train[4:]/1"]
    metrics = trainer.train()
    assert "eval/avg@2" in metrics and "reward/mean" in metrics


def test_no_held_out_problems_give_no_eval_metrics():
    from sdpo.evaluation import evaluate
    from sdpo.rollout.base import SamplingSettings

    assert evaluate(None, env_over(Dataset.from_list(ROWS)), [], lambda p: [1], SamplingSettings(n=2)).metrics == {}


@pytest.mark.slow
def test_model_object_and_path_give_the_same_trainer(tmp_path, tiny_path):
    from transformers import AutoModelForCausalLM

    from sdpo.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16)
    trainer = SDPOTrainer(model=model, tokenizer=load_tokenizer(tiny_path), train_dataset=ROWS,
                          reward_funcs=[contains_word], overrides=overrides(tmp_path))
    assert trainer.learner.unwrapped is model and model.dtype == torch.float32  # placed and cast as a loaded model is
    assert trainer.config.model.name_or_path == str(tiny_path) and trainer.model_path == tiny_path
    before = [p.detach().clone() for p in model.parameters()]
    trainer.training_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    by_path = resolve_inputs(model=str(tiny_path), train_dataset=ROWS, reward_funcs=[contains_word],
                             overrides=overrides(tmp_path / "2"))
    assert by_path.model_path == tiny_path and by_path.model is None and by_path.tokenizer.pad_token_id is not None
    assert by_path.config.model.name_or_path == str(tiny_path)


@pytest.mark.slow
def test_peft_model_trains_its_adapter_and_the_teacher_uses_it(tmp_path, tiny_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainer = SDPOTrainer(model=model, train_dataset=Dataset.from_list(ROWS), reward_funcs=[contains_word],
                          overrides=overrides(tmp_path, "algorithm.teacher.kind=ema"))
    assert trainer.config.model.lora.enabled
    # No full copy of the weights: the EMA teacher is a second adapter on the handed-in model.
    assert trainer.learner.teacher.model is None and "sdpo_ema" in model.peft_config
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and "lora" not in n}
    trainer.training_step()
    params = dict(model.named_parameters())
    assert any(not torch.equal(v, params[n]) for n, v in lora_before.items())
    assert all(torch.equal(v, params[n]) for n, v in base_before.items())


def test_model_object_without_a_checkpoint_needs_the_hf_engine_and_a_tokenizer(tiny_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(tiny_path).config)
    model.config.name_or_path = ""  # built in memory, never saved
    with pytest.raises(ConfigError, match="save it"):
        resolve_inputs(model=model, train_dataset=ROWS, reward_funcs=[contains_word], overrides=["rollout=vllm"])
    with pytest.raises(ValueError, match="pass tokenizer="):
        resolve_inputs(model=model, train_dataset=ROWS, reward_funcs=[contains_word], overrides=["rollout=hf"])


@pytest.mark.slow
def test_overrides_apply_on_top_of_a_config(tmp_path):
    config = load_config(["env=dataset", *overrides(tmp_path)])
    trainer = SDPOTrainer(config, train_dataset=ROWS, eval_dataset=ROWS[:2], reward_funcs=["exact_match"],
                          overrides=["trainer.optim.lr=0.5", "env.system_prompt=Be brief."])
    assert trainer.config.trainer.optim.lr == 0.5
    assert trainer.train_problems[0].messages[0]["content"] == "Be brief."
    assert len(trainer.eval_problems) == 2
    with pytest.raises(ConfigError, match="choose config groups"):
        SDPOTrainer(config, train_dataset=ROWS, reward_funcs=["exact_match"], overrides=["algorithm=grpo"])
    with pytest.raises(ConfigError, match="need the dataset environment"):
        SDPOTrainer(load_config(TINY_OVERRIDES), train_dataset=ROWS, reward_funcs=["exact_match"])


# ---------------------------------------------------------------------------------------------------------------
# the examples run


@pytest.mark.slow
def test_example_notebook_runs(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "examples" / "own_data.ipynb", as_version=4)
    smoke = [o for o in overrides(tmp_path) if not o.startswith(("model=", "algorithm="))]
    # The kernel inherits this process's environment; PYTHONPATH makes it import this checkout's sdpo.
    env = {"SDPO_EXAMPLE_MODEL": "tiny", "SDPO_EXAMPLE_OVERRIDES": " ".join(smoke),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO / "examples")}}).execute()
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert (tmp_path / "run" / "reward_curve.png").exists()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1 and "reward/mean" in metrics[-1]


@pytest.mark.slow
def test_trl_reward_example_runs_trls_function_unchanged(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    try:
        import trl_reward
    finally:
        sys.path.remove(str(REPO / "examples"))
    from trl.rewards import accuracy_reward

    env = env_over(Dataset.from_list(trl_reward.ROWS), reward_funcs=[accuracy_reward], prompt_column="prompt")
    assert env.scoring_mode == "process"
    problem = env.load("train")[0]
    gold = problem.data["columns"]["solution"]
    right, wrong = env.score_batch([problem] * 2, [f"The answer is $\\boxed{{{gold}}}$", "no idea"], [False] * 2)
    assert (right.reward, wrong.reward) == (1.0, 0.0)
    trainer = trl_reward.main(overrides(tmp_path, "model=tiny"))
    assert trainer.step == 1 and isinstance(trainer.env, DatasetEnv)


def test_problem_pickles_without_the_dataset():
    import pickle

    env = env_over(Dataset.from_list(ROWS), reward_funcs=[contains_word])
    clone = pickle.loads(pickle.dumps(env))
    assert clone._given == {"train": None, "eval": None}
    assert clone.score(Problem("p", [{"role": "user", "content": "x"}], {"prompt": "x", "columns": {"word": "ok"}}), "ok").reward == 1.0
