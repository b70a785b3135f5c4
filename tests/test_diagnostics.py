"""Failure-mode metrics (sdpo/diagnostics.py) on hand-made cases whose answers are known, and in a training step."""

from __future__ import annotations

import math

import pytest
from conftest import TINY_OVERRIDES
from toy_envs import ParityEnv, ParityEnvConfig

from sdpo import SDPOTrainer, load_config
from sdpo.config import RepromptConfig
from sdpo.diagnostics import (
    FailureModes,
    contains_phrase,
    context_metrics,
    demo_copy,
    echoes,
    overlap,
    template_phrases,
    too_small_to_move,
    words,
)

CONFIG = RepromptConfig()


def test_template_phrases_are_the_fixed_text_of_the_paper_templates():
    assert template_phrases(CONFIG) == [
        "correctly solve the original question",
        "correct solution",
        "the following is feedback from your unsuccessful earlier attempt",
    ]


def test_a_template_phrase_is_found_whatever_the_case_and_spacing_but_not_inside_other_words():
    phrases = template_phrases(CONFIG)
    assert contains_phrase("42.\n\nCorrect   solution: 42", phrases)
    assert contains_phrase("Let me correctly SOLVE the original question.", phrases)
    assert not contains_phrase("The correct answer is 42.", phrases)
    assert not contains_phrase("incorrect solutions abound", phrases)  # word boundaries, not substrings


def test_feedback_echo_needs_five_words_of_the_feedback_that_the_prompt_does_not_hold():
    feedback = ["56 is not the correct answer."]
    assert echoes("I think 42 is not the correct answer here", feedback, "What is 6 * 7?")
    assert not echoes("The correct answer is 42", feedback, "What is 6 * 7?")  # 4 words in common only
    # The same five words in the student's own prompt are no echo: the student saw them.
    assert not echoes("42 is not the correct answer", feedback, "Say why 56 is not the correct answer.")
    assert not echoes("anything at all", [], "What is 6 * 7?")


def test_overlap_masks_numbers_and_counts_the_responses_trigrams():
    assert words("It is 3.5, not 4!") == ["it", "is", "3.5", "not", "4"]
    # "so it is <num>" has 2 trigrams: (so it is) and (it is <num>); both occur in b once numbers are masked.
    assert overlap("so it is 56", "yes so it is 42") == 1.0
    assert overlap("so it is 56", "it is 42") == 0.5
    assert overlap("56", "56") == 0.0  # no trigram at all


def test_demo_copy_is_the_overlap_beyond_another_questions_success():
    demo = "First multiply seven by eight carefully to get 56"
    other = "The product is 12"
    # A verbatim copy: all 6 trigrams in the demonstration, none in the other success.
    assert demo_copy("multiply seven by eight carefully to get 56", demo, other) == 1.0
    # Only the answer in common with the demonstration: nothing beyond what the other success shares.
    assert demo_copy("The product is 56", demo, other) == pytest.approx(-1.0)
    assert demo_copy("56", demo, other) == 0.0


def test_context_metrics_on_one_hand_made_step():
    questions = ["What is 7 * 8?"] * 2 + ["What is 3 * 4?"] * 2
    responses = ["Correct solution: 56", "multiply seven by eight to get 54",  # group 0: a template echo, a wrong one
                 "12", "I say 13 is not the correct answer"]  # group 1: a success, a feedback echo
    rewards = [1.0, 0.0, 1.0, 0.0]
    groups = [0, 0, 1, 1]
    solutions = [None, "Correct solution: 56", None, "12"]
    feedback = [None, "54 is not the correct answer.", None, "13 is not the correct answer."]
    metrics = context_metrics(CONFIG, questions, responses, solutions, feedback, rewards, groups)
    assert metrics["diagnostics/echo_template_fraction"] == 0.25
    # Rollout 3 repeats five words of group 0's feedback ("is not the correct answer"): counted (its own feedback
    # would not count). Rollout 1 shares nothing with group 1's feedback.
    assert metrics["diagnostics/echo_feedback_fraction"] == 0.25
    # Rollout 1 vs its demo "correct solution <num>": no trigram in common (0) minus vs "12" (0); rollout 3: "i say
    # <num> ..." vs "12" (0) minus vs group 0's success "correct solution <num>" (0): mean 0.
    assert metrics["diagnostics/demo_copy"] == 0.0
    only_one_question = context_metrics(CONFIG, questions[:2], responses[:2], solutions[:2], feedback[:2], rewards[:2],
                                        groups[:2])
    assert math.isnan(only_one_question["diagnostics/demo_copy"])  # no other question's success to compare with
    assert only_one_question["diagnostics/echo_feedback_fraction"] == 0.0


def test_drift_is_measured_against_the_first_step_and_survives_a_checkpoint():
    modes = FailureModes()
    assert modes.drift({"response/length_mean": 20.0, "policy/entropy": 1.5}) == {
        "diagnostics/length_drift": 1.0, "diagnostics/entropy_drift": 0.0}
    resumed = FailureModes()
    resumed.load_state_dict(modes.state_dict())
    assert resumed.drift({"response/length_mean": 10.0, "policy/entropy": 0.5}) == {
        "diagnostics/length_drift": 0.5, "diagnostics/entropy_drift": -1.0}


def test_a_gradient_below_adams_eps_per_coordinate_is_too_small_to_move_the_weights():
    assert too_small_to_move(0.0, 100, 1e-8)
    assert too_small_to_move(1e-7, 100, 1e-8)  # rms coordinate 1e-8 = eps
    assert not too_small_to_move(2e-7, 100, 1e-8)
    assert not too_small_to_move(math.nan, 100, 1e-8)  # a skipped step is counted as skipped, not as small


def test_a_training_step_logs_every_failure_mode_metric(tmp_path):
    config = load_config([*TINY_OVERRIDES, f"trainer.output_dir={tmp_path / 'run'}"])
    trainer = SDPOTrainer(config, env=ParityEnv(ParityEnvConfig()))
    try:
        metrics = trainer.training_step().metrics
    finally:
        trainer.engine.close()
        trainer.run.tracker.close()
    for name in ("echo_template_fraction", "echo_feedback_fraction", "length_drift", "entropy_drift",
                 "small_grad_fraction"):
        assert "diagnostics/" + name in metrics, name
    # demo_copy is logged only on steps where it is defined (two solved questions): a number when present.
    assert math.isfinite(metrics.get("diagnostics/demo_copy", 0.0))
    assert metrics["diagnostics/length_drift"] == 1.0 and metrics["diagnostics/entropy_drift"] == 0.0  # step 0
    assert metrics["diagnostics/small_grad_fraction"] == 0.0  # lr 1e-3 on a random model: a real gradient
