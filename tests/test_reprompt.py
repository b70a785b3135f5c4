"""The reprompt builder (docs/algorithm.md §2): pure string-level cases, then rendering and truncation with a tokenizer."""

from __future__ import annotations

import random

import pytest

from sdpo.config import RepromptConfig
from sdpo.envs.base import Problem
from sdpo.teacher import build_reprompts, fit_bodies, reprompt_stats, strip_thinking, teacher_prompt_ids
from sdpo.teacher.reprompt import TRUNCATION_MARK, pick_demonstrations

CFG = RepromptConfig()
SYSTEM = {"role": "system", "content": "Be brief."}


def problem(i: int = 0) -> Problem:
    return Problem(id=f"q{i}", messages=[SYSTEM, {"role": "user", "content": f"What is {i} + 1?"}], data={})


def build(rewards, feedback=None, groups=None, config=CFG, responses=None, seed=0):
    n = len(rewards)
    groups = groups or [0] * n
    responses = responses or [f"answer {i}" for i in range(n)]
    problems = [problem(g) for g in groups]
    return build_reprompts(problems, responses, rewards, feedback or [""] * n, groups, config, random.Random(seed))


def test_templates_are_the_papers_exact_strings():
    assert CFG.reprompt_template == "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"
    assert CFG.solution_template == "\nCorrect solution:\n\n{successful_previous_attempt}\n\n"
    assert CFG.feedback_template == (
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n"
    )


def test_no_success_and_no_feedback_masks_every_rollout():
    reprompts = build([0.0, 0.0, 0.0])
    assert [r.has_signal for r in reprompts] == [False, False, False]
    assert all(r.solution is None and r.feedback is None for r in reprompts)


def test_lone_success_teaches_the_failures_but_not_itself():
    reprompts = build([0.0, 1.0, 0.0], responses=["bad a", "good", "bad b"])
    assert [r.solution for r in reprompts] == ["good", None, "good"]
    assert [r.has_signal for r in reprompts] == [True, False, True]


def test_lone_success_may_use_itself_when_allowed():
    config = RepromptConfig(dont_reprompt_on_self_success=False)
    reprompts = build([0.0, 1.0], responses=["bad", "good"], config=config)
    assert [r.solution for r in reprompts] == ["good", "good"]


def test_several_successes_pick_a_sibling_never_self_and_seeded():
    rewards = [1.0, 1.0, 1.0, 0.0]
    responses = ["s0", "s1", "s2", "bad"]
    first = build(rewards, responses=responses, seed=3)
    for i, r in enumerate(first[:3]):
        assert r.solution in {"s0", "s1", "s2"} - {responses[i]}
    assert [r.solution for r in build(rewards, responses=responses, seed=3)] == [r.solution for r in first]
    # Over many seeds every eligible sibling is chosen sometimes (random, not always the first).
    chosen = {build(rewards, responses=responses, seed=s)[3].solution for s in range(40)}
    assert chosen == {"s0", "s1", "s2"}


def test_demonstrations_stay_within_their_group():
    picks = pick_demonstrations([1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1], 1.0, True, random.Random(0))
    assert picks == [None, 0, 3, None]


def test_success_threshold_is_respected():
    config = RepromptConfig(success_reward_threshold=0.5)
    reprompts = build([0.6, 0.0], responses=["ok", "bad"], config=config)
    assert reprompts[1].solution == "ok"


def test_feedback_only():
    reprompts = build([0.0, 0.0], feedback=["Wrong Answer on test 1", ""])
    assert reprompts[0].feedback == "Wrong Answer on test 1" and reprompts[0].solution is None
    assert reprompts[0].has_signal and not reprompts[1].has_signal
    text = reprompts[0].user_text(CFG)
    assert text == (
        "What is 0 + 1?"
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\nWrong Answer on test 1\n\n"
        "\n\nCorrectly solve the original question.\n"
    )


def test_feedback_plus_solution_and_the_rules_that_drop_feedback():
    reprompts = build([0.0, 1.0], feedback=["crashed", ""], responses=["bad", "good"])
    text = reprompts[0].user_text(CFG)
    assert text == (
        "What is 0 + 1?\nCorrect solution:\n\ngood\n\n"
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\ncrashed\n\n"
        "\n\nCorrectly solve the original question.\n"
    )
    only_without = RepromptConfig(environment_feedback_only_without_solution=True)
    assert build([0.0, 1.0], feedback=["crashed", ""], responses=["bad", "good"], config=only_without)[0].feedback is None
    assert build([0.0, 0.0], feedback=["crashed", ""], config=only_without)[0].feedback == "crashed"
    no_feedback = RepromptConfig(include_environment_feedback=False)
    assert build([0.0], feedback=["crashed"], config=no_feedback)[0].has_signal is False


def test_the_students_own_attempt_is_never_in_the_teacher_prompt():
    reprompts = build([0.0, 1.0], feedback=["wrong", ""], responses=["MY OWN ATTEMPT", "good"])
    assert "MY OWN ATTEMPT" not in reprompts[0].user_text(CFG)


def test_table_6_feedback_types_solution_only_feedback_only_and_own_attempt():
    kwargs = dict(feedback=["wrong", ""], responses=["MY OWN ATTEMPT", "good"])
    solution_only = build([0.0, 1.0], config=RepromptConfig(include_environment_feedback=False), **kwargs)[0]
    assert (solution_only.solution, solution_only.feedback) == ("good", None)
    feedback_only = build([0.0, 1.0], config=RepromptConfig(include_solution=False), **kwargs)
    assert (feedback_only[0].solution, feedback_only[0].feedback) == (None, "wrong")
    assert not feedback_only[1].has_signal  # the success has no feedback and, here, no demonstration either
    own = build([0.0, 1.0], config=RepromptConfig(include_own_attempt=True), **kwargs)
    assert own[0].user_text(CFG) == (
        "What is 0 + 1?\nCorrect solution:\n\ngood\n\n"
        "\nYour earlier attempt:\n\nMY OWN ATTEMPT\n\n"
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\nwrong\n\n"
        "\n\nCorrectly solve the original question.\n"
    )
    # The own attempt alone is no signal: a lone success still gets no distillation.
    assert not build([1.0], config=RepromptConfig(include_own_attempt=True))[0].has_signal
    with pytest.raises(ValueError, match="leave the teacher nothing to learn from"):
        RepromptConfig(include_solution=False, include_environment_feedback=False, data_context="off")
    # The data's own teacher context (privileged_context) alone is something to learn from.
    RepromptConfig(include_solution=False, include_environment_feedback=False, data_context="prefer")


def test_messages_keep_system_and_replace_the_last_user_message():
    reprompts = build([0.0, 1.0], responses=["bad", "good"])
    messages = reprompts[0].messages(CFG)
    assert messages[0] == SYSTEM
    assert messages[1]["role"] == "user" and messages[1]["content"].startswith("What is 0 + 1?\nCorrect solution:")
    assert len(messages) == 2


def test_thinking_is_removed_from_demonstrations():
    assert strip_thinking("<think>long\nchain</think>The answer is 4.") == "The answer is 4."
    assert strip_thinking("Answer 4 <think>unterminated") == "Answer 4 "
    reprompts = build([0.0, 1.0], responses=["bad", "<think>hmm</think>42"])
    assert reprompts[0].solution == "42"
    keep = RepromptConfig(remove_thinking_from_demonstration=False)
    assert build([0.0, 1.0], responses=["bad", "<think>hmm</think>42"], config=keep)[0].solution == "<think>hmm</think>42"


def test_stats():
    reprompts = build([0.0, 1.0, 0.0, 0.0], feedback=["", "", "f", ""], groups=[0, 0, 1, 1])
    stats = reprompt_stats(reprompts, [0.0, 1.0, 0.0, 0.0], [0, 0, 1, 1], 1.0)
    assert stats.success_group_fraction == 0.5
    assert stats.reprompt_fraction == 0.5  # rollout 0 (solution) and rollout 2 (feedback)
    assert stats.feedback_fraction == 0.25
    assert stats.solution_fraction == 0.25


def test_fit_bodies_shares_the_budget_and_keeps_beginnings():
    encode = lambda s: s.split(" ")  # noqa: E731 - a word "tokenizer"
    decode = " ".join
    solution = " ".join(f"s{i}" for i in range(100))
    feedback = " ".join(f"f{i}" for i in range(10))
    new_solution, new_feedback = fit_bodies(solution, feedback, 50, encode, decode)
    assert new_feedback == feedback  # the short body fits in its half and stays whole
    assert new_solution.startswith("s0 s1") and new_solution.endswith(TRUNCATION_MARK)
    assert len(encode(new_solution)) + len(encode(new_feedback)) <= 50
    assert fit_bodies("a b", None, 10, encode, decode) == ("a b", None)


@pytest.mark.parametrize("budget", [120, 200])
def test_truncation_keeps_question_instruction_and_header(tokenizer, budget):
    config = RepromptConfig(max_reprompt_len=budget)
    long_solution = "step " * 400
    reprompts = build([0.0, 1.0], feedback=["error " * 300, ""], responses=["bad", long_solution], config=config)
    student = [[1, 2, 3]] * 2
    ids = teacher_prompt_ids(reprompts, student, tokenizer, config)
    assert len(ids[0]) <= budget
    text = tokenizer.decode(ids[0])
    assert "What is 0 + 1?" in text
    assert text.endswith("Correctly solve the original question.\n<|im_end|>\n<|im_start|>assistant\n")
    assert TRUNCATION_MARK.strip() in text
    assert "Be brief." in text  # the system message survives
    # The lone success has no signal: it keeps its student prompt.
    assert ids[1] == [1, 2, 3]


def test_a_reprompt_ends_within_the_limit_even_when_truncation_does_not_converge(tokenizer, monkeypatch):
    # Issue #10, defect 4: a reprompt still too long after the retries was kept as is. Here the body fitting never
    # shortens anything, so every retry fails: the reprompt must still end within the limit (bodies dropped).
    import sdpo.teacher.reprompt as reprompt_module

    monkeypatch.setattr(reprompt_module, "fit_bodies", lambda solution, feedback, *args: (solution, feedback))
    config = RepromptConfig(max_reprompt_len=120)
    reprompts = build([0.0, 1.0], feedback=["error " * 300, ""], responses=["bad", "step " * 400], config=config)
    ids = teacher_prompt_ids(reprompts, [[1, 2, 3]] * 2, tokenizer, config)
    assert len(ids[0]) <= 120
    assert tokenizer.decode(ids[0]).endswith("Correctly solve the original question.\n<|im_end|>\n<|im_start|>assistant\n")


def test_a_reprompt_that_cannot_fit_without_its_bodies_is_an_error_naming_the_limit(tokenizer):
    config = RepromptConfig(max_reprompt_len=24)  # less than the system message, question and instruction
    reprompts = build([0.0, 1.0], feedback=["error", ""], config=config)
    with pytest.raises(ValueError, match=r"over algorithm.reprompt.max_reprompt_len=24: raise it"):
        teacher_prompt_ids(reprompts, [[1, 2, 3]] * 2, tokenizer, config)


def test_group_reprompts_seed_each_question_by_its_id_not_its_position():
    from sdpo.teacher import group_reprompts

    problems = [problem(0)] * 4 + [problem(1)] * 4
    responses = [f"answer {i}" for i in range(8)]
    rewards = [1.0, 1.0, 1.0, 0.0] * 2
    together = group_reprompts("0:3", CFG, problems, responses, rewards, [""] * 8, [0] * 4 + [1] * 4)
    alone = group_reprompts("0:3", CFG, problems[4:], responses[4:], rewards[4:], [""] * 4, [7] * 4)
    assert together[4:] == alone  # the same demonstrations whichever other questions share the batch
    assert all(r.solution is not None and r.solution != responses[i] for i, r in enumerate(together[:3]))
