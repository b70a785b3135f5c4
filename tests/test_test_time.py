"""Test-time self-distillation (sdpo/test_time.py): attempts are counted in sampling order, the budget holds, SDPO
updates after every sampled batch while best-of-k never does, and every question starts from the checkpoint."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_OVERRIDES
from sdpo.config import ModelConfig
from sdpo.envs.base import Environment, Problem, Score
from sdpo.hydra_config import load_config
from sdpo.learner import Learner
from sdpo.models import load_tokenizer, resolve_checkpoint
from sdpo.test_time import Discovery, discovery_at, run_test_time, solve
from sdpo.testing import ScriptedEngine
from sdpo.trainer import SDPOTrainer

ANSWER_IDS = [500, 501]


class ExactAnswerEnv(Environment):
    """Reward 1 for one exact response; feedback otherwise (what the SDPO teacher sees)."""

    scoring_mode = "inline"

    def __init__(self, answer: str, num_questions: int = 2) -> None:
        self.answer, self.num_questions = answer, num_questions

    def load(self, split: str) -> list[Problem]:
        return [Problem(id=f"q{i}", messages=[{"role": "user", "content": f"Question {i}?"}]) for i in range(self.num_questions)]

    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
        if response.strip() == self.answer:
            return Score(1.0, "", {"status": "correct"})
        return Score(0.0, "That is not it.", {"status": "wrong"})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_checkpoint(ModelConfig(name_or_path="tiny")))


def scripted(tokenizer, success_call: int | None, success_index: int = 2) -> ScriptedEngine:
    """An engine whose `success_index`-th sample of its `success_call`-th generate call is the answer."""
    engine = ScriptedEngine(tokenizer)

    def respond(prompt, j):
        if engine.calls == success_call and j == success_index:
            return [*ANSWER_IDS, tokenizer.eos_token_id]
        return [600 + j, 601, tokenizer.eos_token_id]

    engine.respond = respond
    return engine


def make_config(tmp_path, *overrides):
    return load_config([*TINY_OVERRIDES, "env.feedback=true", "algorithm.reprompt.max_reprompt_len=256",
                        "trainer.questions_per_step=1", "trainer.mini_batch_questions=1", "eval.every=0",
                        f"trainer.output_dir={tmp_path}", *overrides])


@pytest.fixture
def count_updates(monkeypatch):
    calls = []
    update = Learner.update

    def counting(self, batch, step):
        calls.append(len(batch))
        return update(self, batch, step)

    monkeypatch.setattr(Learner, "update", counting)
    return calls


@pytest.mark.parametrize("method, updates", [("sdpo", 3), ("best_of_k", 0)])
def test_attempts_are_counted_in_sampling_order(tmp_path, tokenizer, count_updates, method, updates):
    env = ExactAnswerEnv(tokenizer.decode(ANSWER_IDS, skip_special_tokens=True))
    config = make_config(tmp_path, "rollout.num_generations=4", "test_time.budget=100")
    found, _ = solve(config, env, env.load("test")[0], method, engine=scripted(tokenizer, success_call=3))
    # Third batch of 4, third sample: attempt 2 * 4 + 3.
    assert found == Discovery("q0", method, attempts=12, solved_at=11)
    assert len(count_updates) == updates  # SDPO updates after each batch (the solving one too); best-of-k never


def test_budget_bounds_the_attempts(tmp_path, tokenizer, count_updates):
    env = ExactAnswerEnv(tokenizer.decode(ANSWER_IDS, skip_special_tokens=True))
    config = make_config(tmp_path, "rollout.num_generations=4", "test_time.budget=10")
    found, _ = solve(config, env, env.load("test")[0], "sdpo", engine=scripted(tokenizer, success_call=None))
    assert found.solved_at is None and found.attempts == 12  # three batches of 4 reach the budget of 10
    assert len(count_updates) == 3


def test_report_and_discovery_at_k(tmp_path, tokenizer):
    env = ExactAnswerEnv(tokenizer.decode(ANSWER_IDS, skip_special_tokens=True), num_questions=2)
    config = make_config(tmp_path, "rollout.num_generations=4", "test_time.budget=16")
    calls = iter([2, None, 1, 5])  # (q0, sdpo), (q0, best_of_k), (q1, sdpo), (q1, best_of_k)
    report = run_test_time(config, env, engine_factory=lambda: scripted(tokenizer, success_call=next(calls)))
    solved = {m: [q["solved_at"] for q in report["questions"][m]] for m in ("sdpo", "best_of_k")}
    assert solved == {"sdpo": [7, 3], "best_of_k": [None, None]}  # call 5 is past the budget of 16 = 4 calls
    assert report["discovery"]["sdpo"] == {1: 0.0, 16: 1.0}
    assert report["discovery"]["best_of_k"] == {1: 0.0, 16: 0.0}
    assert discovery_at([Discovery("a", "sdpo", 8, 7), Discovery("b", "sdpo", 4, 3)], 5) == 0.5


def test_every_question_starts_from_the_checkpoint(tmp_path, tokenizer, monkeypatch):
    # The weights each trainer starts from are the checkpoint's, however many SDPO steps the previous question took.
    starts, after_updates = [], []
    init, update = SDPOTrainer.__init__, Learner.update

    def snapshot(learner):
        return {n: p.detach().clone() for n, p in learner.unwrapped.named_parameters()}

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        starts.append(snapshot(self.learner))

    def recording_update(self, batch, step):
        metrics = update(self, batch, step)
        after_updates.append(snapshot(self))
        return metrics

    monkeypatch.setattr(SDPOTrainer, "__init__", recording_init)
    monkeypatch.setattr(Learner, "update", recording_update)
    env = ExactAnswerEnv(tokenizer.decode(ANSWER_IDS, skip_special_tokens=True), num_questions=2)
    config = make_config(tmp_path, "rollout.num_generations=4", "test_time.budget=8", "test_time.methods=[sdpo]",
                         "trainer.optim.lr=1e-2")
    run_test_time(config, env, engine_factory=lambda: scripted(tokenizer, success_call=None))
    assert len(starts) == 2 and len(after_updates) == 4  # two questions, two SDPO steps each
    first_question_end = after_updates[1]
    assert any(not torch.equal(first_question_end[n], v) for n, v in starts[0].items())  # the steps moved the weights
    for name, value in starts[0].items():
        assert torch.equal(starts[1][name], value), name


class AnsweringEnv(ExactAnswerEnv):
    """Replies to a wrong answer with its feedback (a multi-turn environment)."""

    def follow_up(self, problem: Problem, response: str, score: Score) -> str:
        return score.feedback


def test_multi_turn_baseline_answers_each_attempt_and_counts_turns_as_attempts(tmp_path, tokenizer, count_updates):
    # Four conversations; the third one (first attempt "gamma") succeeds on its third turn (engine call 3).
    env = AnsweringEnv(tokenizer.decode(ANSWER_IDS, skip_special_tokens=True))
    engine, prompts = ScriptedEngine(tokenizer), []
    marker, words = "gamma", ["alpha", "beta", "gamma", "delta"]

    def respond(prompt, j):
        prompts.append(tokenizer.decode(prompt))
        if engine.calls == 1:
            return tokenizer.encode(" " + words[j], add_special_tokens=False) + [tokenizer.eos_token_id]
        if engine.calls == 3 and marker in prompts[-1]:
            return [*ANSWER_IDS, tokenizer.eos_token_id]
        return [700, tokenizer.eos_token_id]

    engine.respond = respond
    config = make_config(tmp_path, "rollout.num_generations=4", "test_time.budget=100")
    found, _ = solve(config, env, env.load("test")[0], "multi_turn", engine=engine)
    assert found == Discovery("q0", "multi_turn", attempts=12, solved_at=11)  # turns of 4, then the third of 4
    assert count_updates == []  # no training
    # Each later attempt sees the question, its own earlier attempts and the environment's reply to each.
    assert engine.calls == 3 and len(prompts) == 12
    last = prompts[-2]  # the third conversation at turn 2
    assert last.count("That is not it.") == 2 and marker in last and "Question 0?" in last


def test_multi_turn_budget_and_report(tmp_path, tokenizer):
    # A single-turn environment ends every conversation after one turn: the baseline starts new ones (best-of-k).
    env = ExactAnswerEnv(tokenizer.decode(ANSWER_IDS, skip_special_tokens=True), num_questions=1)
    config = make_config(tmp_path, "rollout.num_generations=4", "test_time.budget=10",
                         "test_time.methods=[best_of_k,multi_turn]")
    report = run_test_time(config, env, engine_factory=lambda: scripted(tokenizer, success_call=None))
    assert report["questions"]["multi_turn"] == [{"question_id": "q0", "method": "multi_turn", "attempts": 12,
                                                 "solved_at": None}]
    assert report["discovery"]["multi_turn"] == {1: 0.0, 10: 0.0}
